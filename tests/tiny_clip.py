"""The package's tiny open_clip config (HiMo-Tiny), random weights, no downloads."""
import open_clip
import torch

from himo_fast.train import register_model_configs


def tiny_clip(seed=0):
    register_model_configs()
    torch.manual_seed(seed)
    return open_clip.create_model("HiMo-Tiny")
