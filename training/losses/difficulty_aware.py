"""Losses of the difficulty-aware attention network with confidence learning (Nie et al., AAAI 2019).

Training alternates two steps on each batch (the paper: one Adam optimiser per network):

1. segmenter step, ``segmenter_loss(output, target)`` on ``output = model(x)`` in train mode::

       L_Seg = L_DamHyb + lambda_adv * L_ADV            (Eq. 11, lambda_adv = 0.005)
       L_DamHyb = L_FDice + L_FCE                       (Eq. 10)

   with deep supervision: L_DamHyb on the final logits and on the 1/2 and 1/4 scale logits
   (up-sampled to the label), weighted ``deep_supervision_weights``; L_ADV on the final output only.
   Step S's optimiser only. The backward pass also leaves gradients on D's parameters (L_ADV runs
   through D); the confidence step clears them with ``zero_grad`` before its own backward.
2. confidence-network step, ``confidence_loss(output, target, model=model, image=x)``::

       L_D = BCE(D(P U X), 1) + BCE(D(P_hat U X), 0)   (Eq. 4)

   P the one-hot label, P_hat S's probabilities, detached (only D learns here). Step D's optimiser.

Each loss follows the package contract ``loss(output, target, **state) -> (total, parts)``;
``build_difficulty_aware_loss(**config)`` returns both as an :class:`AlternatingLoss`.

Choices where the paper is open:

* sums over voxels (Eq. 2, 5, 8) are means over voxels (and over the batch), so the loss scale and
  lambda_adv do not depend on the patch size;
* the generalised Dice (Eq. 1, 7) is computed per case and averaged over the batch, background
  included (c = 1..C in the paper); the class weights pi_c = 1 / (sum P_c)^2 of a class absent from a
  case take the largest weight of that case (as MONAI's GeneralizedDiceLoss does), and the weights are
  normalised to sum to 1 per case, which leaves Eq. 1 and 7 unchanged but keeps the 1e-5 smoothing
  small against them even for tiny structures (1/count^2 is ~1e-7 for a hippocampus);
* dsc_c (Eq. 7), "the average Dice of category c": by default the Dice of S's arg-max on the batch,
  averaged over its cases (1 for a class absent from both label and prediction), detached; pass
  ``class_dice`` (C,) in ``state`` to use e.g. a running or validation average instead;
* the confidence target follows Eq. 4 literally: 1 at every voxel for the manual label, 0 at every
  voxel for the prediction (not a voxel-wise agreement map); L_ADV (Eq. 6) asks D for 1 on the
  prediction;
* the losses are computed in float32 whatever the autocast dtype of the forward pass;
* F = (1 - M)^beta comes from the model's ``difficulty`` map (beta is a model kwarg, so the map a
  clinician sees is the weight the training used), detached: it weights the loss, it is not learned
  through. Deep supervision weights 1, 1/2, 1/4 (not given in the paper).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from AttnSegLib.models import SegOutput

SMOOTH = 1e-5


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, D, H, W) integer labels -> (N, C, D, H, W) float one-hot."""
    if target.min() < 0 or target.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got values in "
                         f"[{int(target.min())}, {int(target.max())}]")
    return F.one_hot(target.long(), num_classes).movedim(-1, 1).to(torch.float32)


def generalized_dice_loss(probabilities: torch.Tensor, target_one_hot: torch.Tensor,
                          class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Generalised Dice loss (Eq. 1); with ``class_weights`` the organ-level focal Dice (Eq. 7).

    probabilities, target_one_hot: (N, C, D, H, W). class_weights: (C,) or (N, C) extra factors on
    pi_c = 1 / (sum P_c)^2, e.g. (1 - dsc_c)^gamma. Returns the mean over the N cases (scalar).
    """
    dims = tuple(range(2, probabilities.ndim))
    intersection = (probabilities * target_one_hot).sum(dims)                 # (N, C)
    total = (probabilities + target_one_hot).sum(dims)                        # (N, C)
    weights = 1.0 / target_one_hot.sum(dims) ** 2
    absent = torch.isinf(weights)
    weights = weights.masked_fill(absent, 0.0)
    weights = torch.where(absent, weights.max(dim=1, keepdim=True).values, weights)
    if class_weights is not None:
        weights = weights * class_weights
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    dice = (2 * (weights * intersection).sum(1) + SMOOTH) / ((weights * total).sum(1) + SMOOTH)
    return (1.0 - dice).mean()


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                           voxel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy (Eq. 2), or with ``voxel_weights`` F (N, 1, D, H, W) the difficulty-aware one
    (Eq. 8): mean over voxels of -F log P_hat[y]. logits (N, C, D, H, W), target (N, D, H, W)."""
    voxel_loss = F.cross_entropy(logits.float(), target.long(), reduction="none")  # (N, D, H, W)
    if voxel_weights is not None:
        voxel_loss = voxel_loss * voxel_weights[:, 0]
    return voxel_loss.mean()


def hybrid_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_Hyb = L_Dice + L_CE (Eq. 3). logits (N, C, D, H, W), target (N, D, H, W)."""
    probabilities = torch.softmax(logits.float(), dim=1)
    return (generalized_dice_loss(probabilities, one_hot(target, logits.shape[1]))
            + weighted_cross_entropy(logits, target))


def batch_class_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """dsc_c: Dice of the arg-max prediction per class, averaged over the cases, (C,), no gradient.
    A class absent from both prediction and label of a case counts as 1 for that case."""
    num_classes = logits.shape[1]
    with torch.no_grad():
        predicted = one_hot(logits.argmax(1), num_classes)
        reference = one_hot(target, num_classes)
        dims = tuple(range(2, logits.ndim))
        overlap = (predicted * reference).sum(dims)
        total = (predicted + reference).sum(dims)
        dice = torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.ones_like(total))
        return dice.mean(0)


def organ_difficulty_weights(dice: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1 - dsc_c)^gamma, the organ-level attention of Eq. 7. dice (C,) in [0, 1] -> (C,)."""
    return (1.0 - dice).clamp(0.0, 1.0) ** gamma


def difficulty_aware_hybrid_loss(logits: torch.Tensor, target: torch.Tensor, difficulty: torch.Tensor,
                                 organ_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_FDice, L_FCE) of Eq. 7 and 8. logits (N, C, D, H, W), target (N, D, H, W), difficulty F
    (N, 1, D, H, W), organ_weights (1 - dsc_c)^gamma (C,)."""
    probabilities = torch.softmax(logits.float(), dim=1)
    fdice = generalized_dice_loss(probabilities, one_hot(target, logits.shape[1]), organ_weights)
    return fdice, weighted_cross_entropy(logits, target, difficulty)


def adversarial_loss(confidence_logits: torch.Tensor) -> torch.Tensor:
    """L_ADV = BCE(D(S(X)), 1) (Eq. 6), mean over voxels. confidence_logits (N, 1, D, H, W)."""
    return F.binary_cross_entropy_with_logits(confidence_logits, torch.ones_like(confidence_logits))


def confidence_network_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """L_D = BCE(D(P), 1) + BCE(D(S(X)), 0) (Eq. 4), each a mean over voxels; (N, 1, D, H, W) each."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def _upsampled(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="trilinear", align_corners=False)


def segmenter_loss(output: SegOutput, target: torch.Tensor, *, gamma: float = 2.0, lambda_adv: float = 0.005,
                   deep_supervision_weights: tuple[float, float, float] = (1.0, 0.5, 0.25),
                   difficulty_aware: bool = True, class_dice: torch.Tensor | None = None,
                   **state) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Segmenter step: L_Seg = sum_s w_s L_DamHyb(scale s) + lambda_adv L_ADV (Eq. 11).

    ``output``: the model's train-mode output (needs ``aux`` confidence_logits and the two
    deep-supervision logits, and the ``difficulty`` map); ``target`` (N, D, H, W) labels.
    ``difficulty_aware=False`` uses L_Hyb (Eq. 3) instead of L_DamHyb; with ``lambda_adv=0`` as well
    it is the paper's "enUNet + Hybrid" ablation (Table 3).
    ``class_dice`` (C,): dsc_c of Eq. 7, else measured on the batch.
    """
    missing = {"confidence_logits", "deep_supervision.1", "deep_supervision.2"} - output.aux.keys()
    if missing:
        raise ValueError(f"segmenter_loss needs the difficulty_aware network's train-mode aux outputs; "
                         f"missing {sorted(missing)}: call model.train() before the forward pass")
    size = target.shape[1:]
    scales = [output.logits, _upsampled(output.aux["deep_supervision.1"], size),
              _upsampled(output.aux["deep_supervision.2"], size)]
    parts: dict[str, torch.Tensor] = {}
    total = output.logits.new_zeros(())
    if difficulty_aware:
        dice = class_dice if class_dice is not None else batch_class_dice(output.logits, target)
        organ_weights = organ_difficulty_weights(dice.float().to(output.logits.device), gamma)
        difficulty = output.maps["difficulty"].detach().float()
        for scale, (weight, logits) in enumerate(zip(deep_supervision_weights, scales)):
            fdice, fce = difficulty_aware_hybrid_loss(logits, target, difficulty, organ_weights)
            parts[f"fdice.{scale}"], parts[f"fce.{scale}"] = fdice.detach(), fce.detach()
            total = total + weight * (fdice + fce)
    else:
        for scale, (weight, logits) in enumerate(zip(deep_supervision_weights, scales)):
            hybrid = hybrid_loss(logits, target)
            parts[f"hybrid.{scale}"] = hybrid.detach()
            total = total + weight * hybrid
    adversarial = adversarial_loss(output.aux["confidence_logits"])
    parts["adversarial"] = adversarial.detach()
    total = total + lambda_adv * adversarial
    parts["segmenter"] = total.detach()
    return total, parts


def confidence_loss(output: SegOutput, target: torch.Tensor, *, model, image: torch.Tensor,
                    **state) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Confidence-network step: L_D (Eq. 4) on D(one-hot label U X) -> 1 and D(P_hat U X) -> 0.

    ``output``: the segmenter's output for ``image`` (N, M, D, H, W) (its probabilities are
    detached); ``model``: the (unwrapped) difficulty_aware network whose ``confidence_logits`` runs D.
    Gradients reach D's parameters only.
    """
    real = model.confidence_logits(one_hot(target, output.logits.shape[1]).to(image), image)
    fake = model.confidence_logits(torch.softmax(output.logits.detach(), dim=1), image)
    loss = confidence_network_loss(real, fake)
    return loss, {"confidence": loss.detach(),
                  "confidence_real": torch.sigmoid(real.detach()).mean(),
                  "confidence_fake": torch.sigmoid(fake.detach()).mean()}


class AlternatingLoss(NamedTuple):
    """The two losses of an alternating (segmenter / confidence network) training step."""

    segmenter: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    confidence: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def build_difficulty_aware_loss(gamma: float = 2.0, lambda_adv: float = 0.005,
                                deep_supervision_weights=(1.0, 0.5, 0.25),
                                difficulty_aware: bool = True) -> AlternatingLoss:
    """Both step losses with the paper's settings (gamma 2, lambda_adv 0.005) unless overridden."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0 (paper: 2, range [0, 5]), got {gamma}")
    if len(deep_supervision_weights) != 3:
        raise ValueError(f"need three deep_supervision_weights (full, 1/2, 1/4 scale), "
                         f"got {deep_supervision_weights}")
    weights = tuple(float(w) for w in deep_supervision_weights)

    def segmenter(output, target, **state):
        return segmenter_loss(output, target, gamma=gamma, lambda_adv=lambda_adv,
                              deep_supervision_weights=weights, difficulty_aware=difficulty_aware, **state)

    return AlternatingLoss(segmenter=segmenter, confidence=confidence_loss)
