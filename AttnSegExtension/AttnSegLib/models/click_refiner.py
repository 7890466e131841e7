"""The refinement network of interactive correction (:mod:`AttnSegLib.refine`): a small 3D U-Net whose
input is the image, the current class probabilities and one click map per class.

Built like every architecture from a card (``in_channels`` = the card's modalities M, ``num_classes``
= C); its input has M + 2C channels: (N, M + 2C, D, H, W) -> logits (N, C, D, H, W), read as a
correction to the log of the current probabilities (:func:`AttnSegLib.refine.refined_probabilities`).
"""
from __future__ import annotations

import torch

from .base import SegmentationNetwork, SegOutput
from .registry import register_model
from .unet import UNet3D


@register_model("click_refiner", task="refinement")
class ClickRefiner(SegmentationNetwork):
    def __init__(self, in_channels: int, num_classes: int, features=(8, 16, 32, 64)):
        super().__init__()
        self.unet = UNet3D(in_channels + 2 * num_classes, num_classes, features=features)
        self.divisor = self.unet.divisor

    def forward(self, x: torch.Tensor) -> SegOutput:
        return self.unet(x)
