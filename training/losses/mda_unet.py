"""Dual supervision loss of MDA-U-Net (Wang et al., Eq. 6-8).

    L_a = BCE(coarse segmentation of the additional expansive path, mask)    (Eq. 6)
    L_s = BCE(segmentation of the original expansive path, mask)             (Eq. 7)
    L_dual = lambda_out * L_s + lambda_aux * L_a                             (Eq. 8)

Choices where the paper is open:

* Eq. 8 has one weight ("lambda L_a + L_s") while the implementation section sets
  "lambda_out = 10 and lambda_m = 1"; read as weights of the output (L_s) and the middle, additional
  path (L_a), i.e. Eq. 8 with lambda = 0.1 scaled by 10;
* BCE between the softmax probabilities and the one-hot mask (the paper's mask has one channel per
  annotation, its output layer one per class), averaged over channels and voxels; softmax rather than
  per-channel sigmoids because AttnSeg reads logits through a softmax at inference. log(1 - p_c) is
  computed as logsumexp over the other classes minus logsumexp over all, exact even when p_c -> 1.
"""
from __future__ import annotations

from typing import Callable

import torch

from AttnSegLib.models import SegOutput

from .difficulty_aware import one_hot


def softmax_binary_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over classes and voxels of -[y log p + (1 - y) log(1 - p)], p = softmax(logits).
    logits (N, C, D, H, W), target (N, D, H, W) integer labels. Computed in float32."""
    logits = logits.float()
    num_classes = logits.shape[1]
    mask = one_hot(target, num_classes)
    log_total = torch.logsumexp(logits, dim=1, keepdim=True)
    log_p = logits - log_total
    log_rest = torch.stack([torch.logsumexp(torch.cat([logits[:, :c], logits[:, c + 1:]], dim=1), dim=1)
                            for c in range(num_classes)], dim=1)
    log_one_minus_p = log_rest - log_total
    return -(mask * log_p + (1 - mask) * log_one_minus_p).mean()


def dual_supervision_loss(output: SegOutput, target: torch.Tensor, *, lambda_out: float = 10.0,
                          lambda_aux: float = 1.0, **state) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_dual (Eq. 8) on the train-mode output of ``mda_unet`` (needs ``aux["coarse_logits"]``);
    target (N, D, H, W) labels. Returns (total, {"output_bce", "coarse_bce", "dual"})."""
    if "coarse_logits" not in output.aux:
        raise ValueError("dual_supervision_loss needs mda_unet's train-mode aux output 'coarse_logits': "
                         "call model.train() before the forward pass")
    main = softmax_binary_cross_entropy(output.logits, target)
    coarse = softmax_binary_cross_entropy(output.aux["coarse_logits"], target)
    total = lambda_out * main + lambda_aux * coarse
    return total, {"output_bce": main.detach(), "coarse_bce": coarse.detach(), "dual": total.detach()}


def build_mda_unet_loss(lambda_out: float = 10.0, lambda_aux: float = 1.0) -> Callable:
    """The dual supervision loss with the paper's weights (lambda_out 10, lambda_m 1) unless overridden."""
    if lambda_out < 0 or lambda_aux < 0:
        raise ValueError(f"loss weights must be >= 0, got lambda_out={lambda_out}, lambda_aux={lambda_aux}")

    def loss(output, target, **state):
        return dual_supervision_loss(output, target, lambda_out=lambda_out, lambda_aux=lambda_aux, **state)

    return loss
