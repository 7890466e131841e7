"""The loss for an architecture: ``training.losses.build_<architecture>_loss(**weights)``, or MONAI's
DiceCELoss for the plain ``unet`` baseline.

A loss is ``loss(output: SegOutput, target (N, D, H, W) long, **state) -> (total, parts)``; an
architecture trained in alternating steps (``difficulty_aware``) returns an ``AlternatingLoss`` with one
such loss per step. ``state`` carries ``epoch`` and ``iteration`` (e.g. CGA U-Net adds its inter-class
loss after epoch 20).
"""
from __future__ import annotations

import inspect

import torch
from monai.losses import DiceCELoss

from AttnSegLib.models import SegOutput

from . import losses


class DiceCE:
    """Dice + cross-entropy on the final logits (MONAI ``DiceCELoss``, softmax, one-hot labels),
    nnU-Net's default objective and the baseline's. Background is excluded from the Dice term."""

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, include_background: bool = False):
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=include_background,
                               lambda_dice=lambda_dice, lambda_ce=lambda_ce, batch=True)

    def __call__(self, output: SegOutput, target: torch.Tensor, **state) -> tuple[torch.Tensor, dict]:
        total = self.loss(output.logits.float(), target[:, None])
        return total, {"dice_ce": total.detach()}


def build_loss(architecture: str, loss_config: dict):
    """The configured loss for ``architecture``; ``loss_config``: ``{"name", "weights": {...}}``.

    ``name: default`` picks the architecture's own loss (its paper's); ``name: dice_ce`` forces the
    baseline DiceCE on the final logits for any architecture.
    """
    name, weights = loss_config.get("name", "default"), dict(loss_config.get("weights") or {})
    if name == "dice_ce" or (name == "default" and architecture == "unet"):
        return DiceCE(**weights)
    if name != "default":
        raise ValueError(f"unknown loss.name {name!r}; use 'default' (the architecture's paper loss) or 'dice_ce'")
    factory = getattr(losses, f"build_{architecture}_loss", None)
    if factory is None:
        known = sorted(n[len("build_"):-len("_loss")] for n in dir(losses)
                       if n.startswith("build_") and n.endswith("_loss"))
        raise ValueError(f"training.losses has no loss for architecture {architecture!r} "
                         f"(losses exist for: unet, {', '.join(known)}); set loss.name: dice_ce to train "
                         "it with Dice + cross-entropy")
    return factory(**weights)


def loss_parameters(architecture: str, name: str = "default") -> list[str] | None:
    """The ``loss.weights`` keys the loss :func:`build_loss` would build accepts (None: unknown loss,
    left to :func:`build_loss` to refuse)."""
    if name == "dice_ce" or (name == "default" and architecture == "unet"):
        factory = DiceCE
    else:
        factory = getattr(losses, f"build_{architecture}_loss", None) if name == "default" else None
    return None if factory is None else list(inspect.signature(factory).parameters)
