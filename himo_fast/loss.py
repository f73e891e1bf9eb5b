"""The public loss: ``MoLo`` (a drop-in for open_clip's ClipLoss) and ``hide``."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import backends
from .checks import check_config, check_features, check_scalar_tensor, check_tau
from .distributed import check_ranks, gather, with_local_slice
from .factors import component_image, component_text, factored_is_cheaper, materialize


def hide(text_features: torch.Tensor, tau: float = 0.9, backend: str = "auto") -> torch.Tensor:
    """HiDe: each text reconstructed from the top-m principal components of the batch
    (m explains a fraction ``tau`` of the variance), mean added back. Same shape as the
    input, float32 (float64 for float64 input)."""
    check_features("text_features", text_features)
    tau = check_tau(tau)
    backends.check_name(backend)
    with backends.no_autocast(text_features):
        return backends.select(backend, text_features).reconstruction(text_features, tau)


class MoLo(nn.Module):
    """HiMo-CLIP's loss: global InfoNCE + lam * component InfoNCE on HiDe's reconstruction.

    Arguments as open_clip's ClipLoss, plus ``tau``, ``lam``, ``label_smoothing``,
    ``pca_scope`` ("local": PCA on each rank's batch, the authors' recipe; "global": PCA
    on the gathered batch, gathered with gradient) and ``backend``. ``cache_labels`` is
    accepted for compatibility; labels are never materialised by the fused kernels.
    """

    def __init__(self, tau=0.9, lam=1.0, label_smoothing=0.1, local_loss=False,
                 gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 pca_scope="local", backend="auto"):
        super().__init__()
        cfg = check_config(tau=tau, lam=lam, label_smoothing=label_smoothing,
                           local_loss=local_loss, gather_with_grad=gather_with_grad,
                           cache_labels=cache_labels, rank=rank, world_size=world_size,
                           pca_scope=pca_scope, backend=backend)
        backends.check_name(cfg["backend"])
        for key, value in cfg.items():
            setattr(self, key, value)

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, lam={self.lam}, label_smoothing={self.label_smoothing}, "
                f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
                f"rank={self.rank}, world_size={self.world_size}, pca_scope={self.pca_scope!r}, "
                f"backend={self.backend!r}")

    def forward(self, image_features, text_features, logit_scale, logit_bias=None,
                output_dict=False):
        check_features("image_features", image_features)
        check_features("text_features", text_features, like=(image_features, "image_features"))
        logit_scale = check_scalar_tensor("logit_scale", logit_scale, image_features)
        if logit_bias is not None:
            logit_bias = check_scalar_tensor("logit_bias", logit_bias, image_features)
        impl = backends.select(self.backend, image_features)
        if self.world_size > 1 and not torch.compiler.is_compiling():
            check_ranks(rank=self.rank, world_size=self.world_size, features=image_features,
                        config=(self.tau, self.lam, self.label_smoothing, self.local_loss,
                                self.gather_with_grad, self.pca_scope))
        with backends.no_autocast(image_features):
            return self._loss(impl, image_features, text_features, logit_scale, logit_bias,
                              output_dict)

    def _loss(self, impl, image_features, text_features, logit_scale, logit_bias, output_dict):
        v, u = image_features, text_features
        b = v.shape[0]
        distributed = self.world_size > 1
        gather_args = dict(local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                           rank=self.rank, world_size=self.world_size)
        if distributed:
            all_v, all_u = gather([v, u], **gather_args)
        else:
            all_v, all_u = v, u
        local_rows = distributed and self.local_loss  # rows: this rank's; columns: all

        # PCA over the whole batch (global scope, several ranks: the local slice keeps its
        # gradient path) or this rank's.
        texts = (with_local_slice(all_u, u, self.rank)
                 if self.pca_scope == "global" and distributed else u)
        # None: u' at once from the fused op, which keeps no N x d tensor for HiDe
        factors = None if impl.fuses_reconstruction(texts) else impl.hide_factors(texts, self.tau)
        # One basis for every column (single rank, or global PCA): the component logits
        # go through the m-dim subspace when that is narrower than d.
        if (factors is not None and (self.pca_scope == "global" or not distributed)
                and factored_is_cheaper(factors)):
            comp_c, cimg_c = component_text(factors), component_image(factors, all_v)
            comp_r, cimg_r = comp_c, cimg_c
            if local_rows:
                comp_r = comp_c.narrow(0, self.rank * b, b)
                cimg_r = component_image(factors, v)
        else:
            # Fused: u' in the texts' dtype, the one the fused backends' (cuda, triton) dual
            # InfoNCE takes it in, so no fp32 u' (nor its fp32 gradient) beside the bf16 one
            comp = (impl.hide_reconstruction(texts, self.tau, texts.dtype) if factors is None
                    else materialize(factors))
            if self.pca_scope == "global" and distributed:
                comp_c, comp_r = comp, comp.narrow(0, self.rank * b, b)
            else:
                comp_r = comp
                comp_c = gather([comp], **gather_args)[0] if distributed else comp
            cimg_r, cimg_c = v, all_v

        cols = ((all_v, all_u), (cimg_c, comp_c))
        if local_rows:  # this rank's rows against every rank's columns
            rows, offset = ((v, u), (cimg_r, comp_r)), self.rank * b
        else:  # square: every row against every column
            rows, cols, offset = cols, None, 0
        glob, comp_loss = impl.dual_infonce(rows, cols, logit_scale, offset, self.label_smoothing)
        if logit_bias is not None:
            # Softmax cross entropy is invariant to a constant added to every logit: the
            # bias changes neither value nor gradient (exactly zero), as in ClipLoss; a NaN
            # (or infinite) bias still makes every returned loss NaN.
            zero = 0.0 * logit_bias.reshape(()).to(glob.dtype)
            glob, comp_loss = glob + zero, comp_loss + zero
        comp_loss = self.lam * comp_loss
        if output_dict:
            return {"contrastive_loss": glob, "component_loss": comp_loss}
        return glob + comp_loss
