"""Plain 3D U-Net baseline (Cicek et al. 2016, nnU-Net-style blocks), the reference every attention
network is compared with.

Encoder: ``len(features)`` levels of DoubleConv, strided-conv down-sampling between levels.
Decoder: transposed-conv up-sampling, concatenation with the skip, DoubleConv.
Input (N, M, D, H, W) with D, H, W divisible by 2**(len(features)-1); output logits (N, C, D, H, W).
No maps of its own: the predictor still gives probabilities and entropy for it.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import SegmentationNetwork, SegOutput
from .blocks import DoubleConv, UpConv, segmentation_head
from .registry import register_model


@register_model("unet")
class UNet3D(SegmentationNetwork):
    def __init__(self, in_channels: int, num_classes: int, features=(16, 32, 64, 128),
                 norm: str = "instance", act: str = "leaky_relu"):
        super().__init__()
        features = tuple(int(f) for f in features)
        self.divisor = 2 ** (len(features) - 1)
        self.encoder = nn.ModuleList(
            DoubleConv(in_channels if i == 0 else features[i - 1], f, stride=1 if i == 0 else 2,
                       norm=norm, act=act)
            for i, f in enumerate(features)
        )
        self.up = nn.ModuleList(UpConv(features[i + 1], features[i]) for i in reversed(range(len(features) - 1)))
        self.decoder = nn.ModuleList(
            DoubleConv(2 * features[i], features[i], norm=norm, act=act)
            for i in reversed(range(len(features) - 1))
        )
        self.head = segmentation_head(features[0], num_classes)

    def forward(self, x: torch.Tensor) -> SegOutput:
        self.check_input(x)
        skips = []
        for block in self.encoder:
            x = block(x if not skips else skips[-1])
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.decoder):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return SegOutput(self.head(x), {}, {})
