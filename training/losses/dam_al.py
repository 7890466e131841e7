"""Loss of DAM-AL (Hoang et al., SAC 2022): Dice plus the hard-case attention loss (Sec. 2.2.2).

    W^c_i = 1 / (min_{j in T^c} d(i, j) + 1)                        (Eq. 6, surface weight map)
    L_Attention = sum_{i, c} W^c_i (P^c_i)^2        where i is not of class c
                + sum_{i, c} W^c_i (1 - P^c_i)^2    where i is of class c        (Eq. 7)
                = sum_{i, c} W^c_i (P^c_i - T^c_i)^2
    L = (1 - lambda) L_Dice + lambda L_Attention

P = softmax(logits), T the one-hot label; W comes from the label (``surface_weight_map`` in
``AttnSegLib.models.dam_al``: a Euclidean distance transform, scipy), per case and class.

Choices where the paper is open (the first three follow the authors' code):

* the sum of Eq. 7 is divided by sum_{i, c} W^c_i, a W-weighted mean, so the loss scale does not grow
  with the patch size or the number of surface voxels;
* background is left out of Eq. 7 (the classes are the tissues WM, GM, CSF), ``include_background``
  puts it back;
* lambda = 0.3 (``attention_weight``), the Dice a V-Net Dice (squared denominator) over all classes
  including background, per case, from MONAI;
* distances in voxels unless ``spacing`` (D, H, W in mm) is given (iSeg is 1 mm isotropic).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from AttnSegLib.models import SegOutput
from AttnSegLib.models.dam_al import surface_weight_map

VNET_DICE = DiceLoss(include_background=True, to_onehot_y=True, softmax=True, squared_pred=True)


def surface_weights(target: torch.Tensor, num_classes: int, spacing=None) -> torch.Tensor:
    """Eq. 6 for a batch: (N, D, H, W) labels -> (N, C, D, H, W) float weights on target's device."""
    labels = target.detach().cpu().numpy()
    weights = np.stack([surface_weight_map(case, num_classes, spacing) for case in labels])
    return torch.from_numpy(weights).to(target.device)


def hard_case_attention_loss(probabilities: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                             include_background: bool = False) -> torch.Tensor:
    """Eq. 7 normalised by the total weight: sum W (P - T)^2 / sum W.

    probabilities, weights: (N, C, D, H, W); target (N, D, H, W) integer labels. Scalar.
    """
    one_hot = F.one_hot(target.long(), probabilities.shape[1]).movedim(-1, 1).to(probabilities)
    first = 0 if include_background else 1
    weights = weights[:, first:]
    squared_error = (probabilities[:, first:] - one_hot[:, first:]) ** 2
    return (weights * squared_error).sum() / weights.sum()


def dam_al_loss(output: SegOutput, target: torch.Tensor, *, attention_weight: float = 0.3,
                include_background: bool = False, spacing=None, **state) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1 - lambda) Dice + lambda L_Attention on ``output.logits`` (N, C, D, H, W) and target
    (N, D, H, W). Returns (total, {"dice", "attention", "total"})."""
    logits = output.logits.float()
    weights = surface_weights(target, logits.shape[1], spacing)
    dice_term = VNET_DICE(logits, target.unsqueeze(1))
    attention_term = hard_case_attention_loss(torch.softmax(logits, dim=1), target, weights, include_background)
    total = (1.0 - attention_weight) * dice_term + attention_weight * attention_term
    return total, {"dice": dice_term.detach(), "attention": attention_term.detach(), "total": total.detach()}


def build_dam_al_loss(attention_weight: float = 0.3, include_background: bool = False, spacing=None) -> Callable:
    """The DAM-AL loss with the authors' weighting (lambda = 0.3) unless overridden."""
    if not 0.0 <= attention_weight <= 1.0:
        raise ValueError(f"attention_weight (lambda) must lie in [0, 1], got {attention_weight}")

    def loss(output, target, **state):
        return dam_al_loss(output, target, attention_weight=attention_weight, include_background=include_background,
                           spacing=spacing, **state)

    return loss
