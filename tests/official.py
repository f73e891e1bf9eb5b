"""An independent transcription of the authors' HiMo-CLIP loss (SPEC section 1), as the
paper's code does it: torch.linalg.svd, a host sync for m, N x N logit matrices. Tests
compare himo_fast against this; it shares no code with the package."""
import torch
import torch.nn.functional as F


def official_hide(u, tau):
    # torch's SVD has no bf16/fp16 kernels; in open_clip's AMP training the normalised
    # features reach the loss in float32 anyway, so low-precision inputs are upcast here.
    if u.dtype in (torch.bfloat16, torch.float16):
        return official_hide(u.float(), tau).to(u.dtype)
    mean = u.mean(dim=0, keepdim=True)
    centred = u - mean
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    var = s ** 2
    ratio = torch.cumsum(var, dim=0) / torch.clamp(var.sum(), min=1e-8)
    m = min(int((ratio < tau).sum().item()) + 1, s.numel())
    p = vh[:m]
    return centred @ p.T @ p + mean


def official_m(u, tau):
    if u.dtype in (torch.bfloat16, torch.float16):
        u = u.float()
    centred = u - u.mean(dim=0, keepdim=True)
    var = torch.linalg.svdvals(centred) ** 2
    ratio = torch.cumsum(var, dim=0) / torch.clamp(var.sum(), min=1e-8)
    return min(int((ratio < tau).sum().item()) + 1, var.numel())


def _ce(logits, labels, eps):
    return F.cross_entropy(logits, labels, label_smoothing=eps)


def official_loss(image, text, scale, tau=0.9, lam=1.0, eps=0.1, logit_bias=None,
                  all_image=None, all_text=None, all_comp=None, comp=None, rank=0):
    """Single rank when all_* are None; otherwise local rows against the gathered columns."""
    if comp is None:
        comp = official_hide(text, tau)
    if all_image is None:
        all_image, all_text, all_comp = image, text, comp
        labels = torch.arange(image.shape[0], device=image.device)
    else:
        labels = rank * image.shape[0] + torch.arange(image.shape[0], device=image.device)
    bias = 0.0 if logit_bias is None else logit_bias
    glob = 0.5 * (_ce(scale * image @ all_text.T + bias, labels, eps)
                  + _ce(scale * text @ all_image.T + bias, labels, eps))
    comp_loss = 0.5 * (_ce(scale * image @ all_comp.T + bias, labels, eps)
                       + _ce(scale * comp @ all_image.T + bias, labels, eps))
    return glob, lam * comp_loss
