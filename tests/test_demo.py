"""The main job's machinery on a tiny budget: training in process, the paired statistics,
the files it writes; and the train-step benchmark."""
import json
import math

import pytest

from himo_fast.train import demo


def test_paired_interval_known_answers():
    ci = demo.paired([3.0, 5.0, 4.0], [1.0, 2.0, 3.0])  # differences 2, 3, 1
    assert ci["mean"] == pytest.approx(2.0)
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert (ci["low"], ci["high"]) == pytest.approx((2.0 - half, 2.0 + half))
    assert demo.verdict(ci).startswith("no clear difference")  # -0.48 .. +4.48
    assert demo.verdict(demo.paired([3.0, 3.1, 2.9], [1.0, 1.0, 1.0])) == "MoLo higher"
    assert demo.verdict(demo.paired([1.0, 2.0], [2.0, 1.0])).startswith("no clear difference")
    assert demo.verdict(demo.paired([0.0, 0.1], [1.0, 1.2])) == "ClipLoss higher"


def test_chance_levels():
    assert demo.chance_levels(256) == {"R@1": 100 / 256, "HiMo@2": 50.0, "HiMo@3": 100 / 6,
                                       "HiMo@4": 0.0}


def test_demo_runs_both_losses_and_writes_its_files(tmp_path, capsys):
    demo.main(["--steps", "4", "--eval-every", "2", "--seeds", "0", "1", "--train-size", "256",
               "--val-size", "32", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "MoLo - ClipLoss" in out and "conclusion:" in out and "chance" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(results["runs"]) == ["clip", "molo"]
    for runs in results["runs"].values():
        assert [r["seed"] for r in runs] == [0, 1]
        assert [h["step"] for h in runs[0]["history"]] == [0, 2, 4]
        assert all(0.0 <= h["R@1"] <= 100.0 for r in runs for h in r["history"])
    assert set(results["paired_difference"]) == set(demo.METRICS)
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "results.json"]


def test_train_step_benchmark_quick(tmp_path):
    from himo_fast.train import bench
    out = tmp_path / "steps.json"
    bench.main(["train-step", "--config", "cpu", "--steps", "2", "--warmup", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["train_step"]
    assert [r["loss"] for r in rows] == ["clip", "molo", "official"]
    for r in rows:
        assert r["median_s"] > 0 and r["samples_per_s"] > 0 and r["batch"] == 128
        assert r["host_syncs_per_step"] is None  # no device on the CPU


def test_train_step_benchmark_runs_the_triton_backend(tmp_path, triton_device):
    # molo-triton (the GPU default's extra row: the fused dual InfoNCE) runs here through
    # the interpreter, on the CPU when there is no GPU.
    from himo_fast.train import bench
    out = tmp_path / "steps.json"
    bench.main(["train-step", "--config", "cpu", "--loss", "molo-triton", "--steps", "1",
                "--warmup", "0", "--device", triton_device.type, "--json", str(out)])
    (row,) = json.loads(out.read_text())["train_step"]
    assert row["loss"] == "molo-triton" and row["median_s"] > 0
