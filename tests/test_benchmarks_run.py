"""The benchmark suite runs (short shapes), so that it cannot rot."""
import os
import subprocess
import sys
from pathlib import Path


def test_benchmark_suite_quick(tmp_path):
    bench = Path(__file__).parent.parent / "benchmarks"
    env = dict(os.environ, HIMO_BENCH_QUICK="1")
    out = subprocess.run([sys.executable, "-m", "pytest", str(bench), "--benchmark-only", "-q",
                          "-p", "no:cacheprovider", f"--benchmark-json={tmp_path / 'b.json'}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    import json
    runs = json.loads((tmp_path / "b.json").read_text())["benchmarks"]
    names = {b["name"] for b in runs}
    assert any("himo_fast" in n for n in names) and any("official" in n for n in names)
    assert any("hide" in n and "official_svd" in n for n in names)
    assert all(b["extra_info"]["samples_per_s"] > 0 for b in runs)
