"""python -m himo_fast.bench report: known benchmark JSON in, known table and a PNG out."""
import json

import pytest

from himo_fast.train import bench


def _bench(name, group, median, **extra):
    return {"name": name, "group": group, "stats": {"median": median}, "extra_info": extra}


def _write_run(path):
    runs = [
        _bench("test_forward_backward[single-1k-himo_fast]", "single-1k B=1024 N=1024 d=768 cpu",
               0.25, samples_per_s=4096.0, tflops=0.08, peak_extra_mib=30.0),
        _bench("test_forward_backward[single-1k-official]", "single-1k B=1024 N=1024 d=768 cpu",
               0.75, samples_per_s=1365.3, tflops=0.027, peak_extra_mib=120.0),
        _bench("test_forward_backward[large-16k-himo_fast]", "large-16k B=16384 N=16384 d=768 cuda",
               0.5, peak_extra_mib=300.0),
        _bench("test_hide_forward_backward[128-official_svd]", "HiDe N=128 d=768 cuda", 0.004),
        _bench("test_hide_forward_backward[128-triton]", "HiDe N=128 d=768 cuda", 0.001),
    ]
    path.write_text(json.dumps({"benchmarks": runs, "datetime": "2026-11-22T00:00:00"}))


def test_report_table_and_plot(tmp_path):
    _write_run(tmp_path / "run1.json")
    (tmp_path / "notes.json").write_text("[1, 2]")  # not a benchmark file: ignored
    pytest.importorskip("matplotlib")
    bench.main(["report", "--results", str(tmp_path)])
    md = (tmp_path / "REPORT.md").read_text()
    assert "| official | 750 ms | 3.00x | 1.37e+03 | 0.027 | 120.0 |" in md
    assert "| himo_fast | 250 ms | 1.00x |" in md
    assert "| official_svd | 4 ms | 4.00x |" in md  # HiDe: ratio to the fastest backend
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_plot_shows_square_workloads_of_the_newest_run_per_device(tmp_path):
    _write_run(tmp_path / "20261101-old.json")
    newer = [_bench("test_forward_backward[single-1k-himo_fast]", "single-1k B=1024 N=1024 d=768 cpu", 0.2),
             _bench("test_forward_backward[paper-rank-himo_fast]", "paper-rank B=128 N=1024 d=768 cpu", 0.07)]
    (tmp_path / "20261122-new.json").write_text(json.dumps({"benchmarks": newer}))
    lines = bench.plotted_lines(bench.load(tmp_path))
    assert sorted(lines) == [("20261101-old", "cuda", "himo_fast"), ("20261122-new", "cpu", "himo_fast")]
    assert [r["median"] for r in lines[("20261122-new", "cpu", "himo_fast")]] == [0.2]


def test_report_without_results_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="benchmark-json"):
        bench.main(["report", "--results", str(tmp_path), "--no-png"])
