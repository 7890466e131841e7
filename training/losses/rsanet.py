"""Loss of RSANet (Zhang et al., MICCAI 2019, Sec. 3.1): exponentially weighted cross-entropy.

The paper, for lesion portion r: weights e^r / (e^r + e^(1-r)) for lesion and e^(1-r) / (e^r + e^(1-r))
for the rest. Generalised to C classes with class portions f_c:

    w_c = exp(1 - f_c) / sum_k exp(1 - f_k),     L = sum_i w_{y_i} CE_i / sum_i w_{y_i}

Choice: read literally, the paper's expressions give the lesion (r = 5e-4) weight 0.27 and the
background 0.73, down-weighting the rare class the weighting is introduced for ("the data imbalance
problem is critical"); the two exponents are swapped in the text. With exp(1 - f_c) a class gets
the weight e^(1 - its portion): for two classes this is the paper's pair of expressions with the
lesion on the e^(1-r) side (lesion 0.73, background 0.27), and a rarer class always weighs more.

f_c is "on average the portion" of class c: pass ``class_frequencies`` measured on the training set
(``class_frequencies_of``); without it the portions of the current batch are used. The mean is
normalised by the weights of the voxels' classes (PyTorch's weighted cross-entropy), so the loss
stays on the scale of a plain cross-entropy.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from AttnSegLib.models import SegOutput


def class_frequencies_of(labels, num_classes: int) -> torch.Tensor:
    """Portion of the voxels of each class over one or more label tensors (any shapes) -> (C,)."""
    counts = sum(torch.bincount(torch.as_tensor(label).long().flatten(), minlength=num_classes)[:num_classes]
                 for label in labels)
    return counts.double() / counts.sum()


def exponential_class_weights(frequencies: torch.Tensor) -> torch.Tensor:
    """w_c = exp(1 - f_c) / sum_k exp(1 - f_k) for class portions f (C,) -> (C,)."""
    return torch.softmax(1.0 - torch.as_tensor(frequencies, dtype=torch.float64), dim=0)


def rsanet_loss(output: SegOutput, target: torch.Tensor, *, class_frequencies: Sequence[float] | None = None,
                **state) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Exponentially weighted cross-entropy of ``output.logits`` (N, C, D, H, W) against target
    (N, D, H, W). Returns (total, {"weighted_ce", "total"})."""
    logits = output.logits.float()
    num_classes = logits.shape[1]
    frequencies = (class_frequencies_of([target], num_classes) if class_frequencies is None
                   else torch.as_tensor(class_frequencies, dtype=torch.float64))
    if frequencies.shape != (num_classes,):
        raise ValueError(f"class_frequencies needs one portion per class ({num_classes}), got {tuple(frequencies.shape)}")
    weights = exponential_class_weights(frequencies).to(logits)
    loss = F.cross_entropy(logits, target.long(), weight=weights)
    return loss, {"weighted_ce": loss.detach(), "total": loss.detach()}


def build_rsanet_loss(class_frequencies: Sequence[float] | None = None) -> Callable:
    """The exponentially weighted cross-entropy; ``class_frequencies`` (C,) from the training set, or
    None to use each batch's portions."""
    if class_frequencies is not None:
        frequencies = torch.as_tensor(class_frequencies, dtype=torch.float64)
        if frequencies.ndim != 1 or (frequencies < 0).any() or abs(frequencies.sum().item() - 1.0) > 1e-3:
            raise ValueError(f"class_frequencies must be per-class portions >= 0 summing to 1, "
                             f"got {class_frequencies}")

    def loss(output, target, **state):
        return rsanet_loss(output, target, class_frequencies=class_frequencies, **state)

    return loss
