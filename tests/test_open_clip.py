"""A real open_clip CLIP (tiny config, random weights, no downloads) trained one step with MoLo."""
import open_clip
import torch

import himo_fast


def test_open_clip_training_step_with_molo():
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16),
        text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=1),
        output_dict=True,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = himo_fast.MoLo()
    images, texts = torch.randn(8, 3, 32, 32), torch.randint(1, 64, (8, 16))
    before = model.visual.conv1.weight.detach().clone()
    # open_clip's training step: losses = loss(**model_out, output_dict=True); sum of values.
    model_out = model(images, texts)
    losses = loss(**model_out, output_dict=True)
    total = sum(losses.values())
    assert set(losses) == {"contrastive_loss", "component_loss"}
    assert torch.isfinite(total)
    total.backward()
    assert model.logit_scale.grad is not None and torch.isfinite(model.logit_scale.grad)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    assert not torch.equal(before, model.visual.conv1.weight)
