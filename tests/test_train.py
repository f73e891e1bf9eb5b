"""The train command: open_clip_train with MoLo, single process and 2-process gloo."""
import math
import os
import re
import subprocess
import sys

import torch

from himo_fast.train import shapes_dataset as shapes
from himo_fast.reference import component_count
from himo_fast.train import himo_parser, make_loss
from conftest import pairs


def test_flags_reach_molo():
    himo, rest = himo_parser().parse_known_args(
        ["--himo-tau", "0.5", "--himo-lambda", "0.3", "--himo-label-smoothing", "0.0",
         "--himo-pca-scope", "global", "--himo-backend", "reference", "--batch-size", "4"])
    assert rest == ["--batch-size", "4"]  # everything else goes to open_clip
    oc_args = type("Args", (), dict(local_loss=True, gather_with_grad=True, rank=1, world_size=2))
    loss = make_loss(himo, oc_args)
    assert (loss.tau, loss.lam, loss.label_smoothing, loss.pca_scope, loss.backend) == \
        (0.5, 0.3, 0.0, "global", "reference")
    assert (loss.local_loss, loss.gather_with_grad, loss.rank, loss.world_size) == (True, True, 1, 2)
    # a changed tau changes the chosen number of components
    _, u = pairs(64, 48, seed=0, requires_grad=False)
    himo99, _ = himo_parser().parse_known_args(["--himo-tau", "0.99"])
    m = [int(component_count(u, make_loss(h, oc_args).tau)) for h in (himo, himo99)]
    assert m[0] < m[1]


def _train_cmd(tmp_path, name, extra):
    data = shapes.write_split(tmp_path, "train", 32, seed=0, px=32)
    return ["-m", "himo_fast.train", "--train-data", str(data), "--dataset-type", "csv",
            "--csv-separator", "\t", "--model", "HiMo-Tiny", "--force-image-size", "32",
            "--batch-size", "8", "--epochs", "1", "--lr", "1e-3", "--warmup", "1", "--workers", "0",
            "--precision", "fp32", "--device", "cpu", "--seed", "0", "--logs", str(tmp_path / "logs"),
            "--name", name, "--log-every-n-steps", "1", *extra]


def _finite_losses(log: str, n_min: int):
    found = [float(x) for x in re.findall(r"Component_loss: ([-+0-9.eE]+|nan|inf)", log)]
    assert len(found) >= n_min, log[-2000:]
    assert all(math.isfinite(x) for x in found)


def test_train_two_process_gloo(tmp_path):
    # What torchrun does, without its argument parser (which trips over open_clip's --logs):
    # one process per rank with the env:// rendezvous variables.
    cmd = [sys.executable] + _train_cmd(tmp_path, "ddp", [
        "--dist-backend", "gloo", "--local-loss", "--gather-with-grad", "--himo-long-text", "248"])
    procs = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=env))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    assert "world size 2" in logs[0].lower() or "world_size: 2" in logs[0].lower(), logs[0][-3000:]
    _finite_losses(logs[0], 2)
    ckpt = tmp_path / "logs" / "ddp" / "checkpoints" / "epoch_1.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    pos = [v for k, v in state.items() if k.endswith("positional_embedding") and "visual" not in k]
    assert pos and pos[0].shape[0] == 248  # trained with 248-token texts


def test_train_clip_loss_switch(tmp_path):
    out = subprocess.run([sys.executable] + _train_cmd(tmp_path, "clip", ["--himo-loss", "clip"]),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    log = out.stdout + out.stderr
    assert "Contrastive_loss" in log and "Component_loss" not in log
