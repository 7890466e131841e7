"""Losses of CGA U-Net (Li et al. 2021, Sec. 3.1-3.4): L = L_M + w_A L_A [+ w_I L_I after a few epochs].

    L_M = softmax Dice of the segmentation                                   (main loss)
    L_A = MSE(S, G), G the one-hot label down-sampled to S's size            (attention map loss)
    D   = sum_{0 < i, j <= C_l} ||p_i - p_j||_2                              (Eq. 9)
    L_I = log(1 / (1 + D))                                                   (Eq. 10, inter-class loss)

S, the prototypes p_k and their mask weights come from the model's train-mode ``aux``. L_I joins the
total from epoch ``inter_start_epoch`` on (paper: after 20 epochs), so the loss needs ``epoch`` in
its state; before that it is still reported.

Choices where the paper is open:

* w_A = 1: the paper keeps L_M and L_A at the same, fixed weight (the authors' code scales the MSE by
  20); w_I = 0.1, the paper's "weight for L_I to keep it at the same order of magnitude" (log(1 + D)
  is a few units for prototypes of tens of channels, the Dice at most 1);
* G: nearest-neighbour down-sampling of the label, then one-hot (as the paper says and the code
  does); the softmax Dice leaves out background, pools the batch and averages the classes (MONAI;
  the code sums the classes);
* D sums the Euclidean distances over ordered pairs (i, j), as Eq. 9 is written (each unordered pair
  twice), over the classes present in the mask of the case only (an absent class has no prototype);
  L_I is averaged over the cases of the batch.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from AttnSegLib.models import SegOutput

SOFTMAX_DICE = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
REQUIRED_AUX = ("category_attention", "class_prototypes", "class_voxel_counts")


def downsampled_one_hot(target: torch.Tensor, num_classes: int, size) -> torch.Tensor:
    """Category guided map G: (N, D, H, W) labels -> nearest down-sampling to ``size`` -> one-hot
    (N, C, *size) float."""
    small = F.interpolate(target[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
    return F.one_hot(small, num_classes).movedim(-1, 1).float()


def inter_class_distance(prototypes: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Eq. 9 per case: D = sum over ordered pairs (i, j) of present classes of ||p_i - p_j||.

    prototypes (N, K, F), present (N, K) bool. Returns (N,).
    """
    squared = ((prototypes[:, :, None] - prototypes[:, None]) ** 2).sum(-1)     # (N, K, K)
    distance = squared.clamp_min(torch.finfo(squared.dtype).tiny).sqrt()         # finite gradient at 0
    pairs = present[:, :, None] & present[:, None] & ~torch.eye(present.shape[1], dtype=torch.bool,
                                                                device=present.device)
    return (distance * pairs).sum((1, 2))


def cga_unet_loss(output: SegOutput, target: torch.Tensor, *, epoch: int | None = None,
                  attention_weight: float = 1.0, inter_weight: float = 0.1, inter_start_epoch: int = 20,
                  **state) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_M + w_A L_A (+ w_I L_I once ``epoch >= inter_start_epoch``) on the train-mode output of
    ``cga_unet``; target (N, D, H, W) labels. Returns (total, {"dice", "attention_mse",
    "inter_class", "inter_distance", "total"})."""
    missing = [name for name in REQUIRED_AUX if name not in output.aux]
    if missing:
        raise ValueError(f"the CGA U-Net loss needs the train-mode aux outputs {missing}: "
                         "call model.train() before the forward pass")
    if epoch is None:
        raise ValueError("the CGA U-Net loss needs the current epoch (pass epoch=...) to switch the "
                         f"inter-class loss on from epoch {inter_start_epoch}")
    logits = output.logits.float()
    attention = output.aux["category_attention"].float()
    guide = downsampled_one_hot(target, logits.shape[1], attention.shape[2:]).to(attention)
    main = SOFTMAX_DICE(logits, target[:, None])
    attention_mse = F.mse_loss(attention, guide)
    present = output.aux["class_voxel_counts"] > 0
    distance = inter_class_distance(output.aux["class_prototypes"].float(), present)
    inter = -torch.log1p(distance).mean()                                        # Eq. 10
    total = main + attention_weight * attention_mse
    if epoch >= inter_start_epoch:
        total = total + inter_weight * inter
    parts = {"dice": main, "attention_mse": attention_mse, "inter_class": inter,
             "inter_distance": distance.mean(), "total": total}
    return total, {name: value.detach() for name, value in parts.items()}


def build_cga_unet_loss(attention_weight: float = 1.0, inter_weight: float = 0.1,
                        inter_start_epoch: int = 20) -> Callable:
    """The CGA U-Net loss; call it with ``epoch=`` in the state."""
    if attention_weight < 0 or inter_weight < 0 or inter_start_epoch < 0:
        raise ValueError(f"weights and start epoch must be >= 0, got attention_weight={attention_weight}, "
                         f"inter_weight={inter_weight}, inter_start_epoch={inter_start_epoch}")

    def loss(output, target, **state):
        return cga_unet_loss(output, target, attention_weight=attention_weight, inter_weight=inter_weight,
                             inter_start_epoch=inter_start_epoch, **state)

    return loss
