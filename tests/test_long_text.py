"""Long-CLIP position stretch for 248-token texts."""
import open_clip
import pytest
import torch

from himo_fast.train.long_text import stretch_model, stretch_positions
from tiny_clip import tiny_clip


def test_stretch_positions_values():
    pos = torch.randn(77, 8, dtype=torch.float64)
    new = stretch_positions(pos)
    assert new.shape == (248, 8)
    assert torch.equal(new[:20], pos[:20])  # bit-identical
    assert torch.equal(new[20::4][:57], pos[20:])  # every 4th is an original position
    assert torch.allclose(new[21], 0.75 * pos[20] + 0.25 * pos[21])
    assert torch.allclose(new[-1], pos[-1] + 0.75 * (pos[-1] - pos[-2]))
    with pytest.raises(ValueError, match="keep"):
        stretch_positions(pos, keep=80)


def test_stretched_model_encodes_248_tokens():
    model = tiny_clip()
    before = model.positional_embedding.detach().clone()
    stretch_model(model)
    assert torch.equal(model.positional_embedding[:20], before[:20])
    tok = open_clip.get_tokenizer("RN50", context_length=248)
    long_caption = " ".join(["a small red square above a large blue circle."] * 30)
    ids = tok([long_caption, "a cat."])
    assert ids.shape == (2, 248) and (ids[0] != 0).sum() > 77
    with torch.no_grad():
        out = model.encode_text(ids)
    assert out.shape == (2, model.text_projection.shape[1]) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="context_length"):
        stretch_model(tiny_clip(), context_length=250)
