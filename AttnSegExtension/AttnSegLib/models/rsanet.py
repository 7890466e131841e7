"""RSANet (Zhang et al., MICCAI 2019): 3D U-Net with recurrent slice-wise attention (RSA) blocks.

Backbone: the 3D U-Net of AttnSeg's ``unet`` baseline (the paper's backbone is "3D U-Net", and its
Table 1 compares RSANet with that U-Net): ``len(features)`` levels of two 3x3x3 conv-norm-act, the
first strided by 2 from level 2 on, transposed-conv up-sampling, concatenation, two convs, 1x1x1 head.

RSA block (``RecurrentSliceAttention`` in ``blocks.py``, Eq. 1-2): slice attention along the
sagittal, then coronal, then axial axis, the three steps sharing their query/key/value 1x1x1 convs,
each with its own alpha (learnable, starting at ``alpha_init``: 0 by default, 1 in the shipped
package). ``placement`` (the paper's RSA-010/101/111) says where blocks sit, one character per position:

1. encoder, second-bottom level (after its convs, before the skip and the down-sampling);
2. bottom level (bottleneck);
3. decoder, second-bottom level (after its convs).

``forward(x (N, M, D, H, W)) -> SegOutput``, D, H, W divisible by 2**(len(features) - 1):

* ``logits`` (N, C, D, H, W);
* ``maps["slice_attention.sagittal" | ".coronal" | ".axial"]`` (N, 1, d, h, w) at the resolution
  of the last RSA block in the network (the decoder block for "101"/"111", the bottleneck for "010"):
  for the D x D attention matrix A of an axis (rows sum to 1, A[i, j] the weight of slice j in the
  new slice i), the attention slice j *receives*, mean_i A[i, j], in [0, 1], broadcast over slice j.
  Uniform attention reads 1 / (number of slices) everywhere; a high slice is one the other slices
  draw on;
* ``aux["slice_attention.<position>.<axis>"]`` (N, S, S) in training mode: the raw matrices of every
  block, <position> one of ``encoder``, ``bottom``, ``decoder``.

Choices where the paper is open:

* the query/key/value convs map C -> C channels with a bias (Eq. 1 multiplies C*H*W-long slice
  vectors; the paper says the SA blocks "share the same convolutional kernel parameters" but not
  their widths);
* the slice dot products are divided by sqrt(C*H*W) (``scaled_attention``; False gives Eq. 1 as
  written): unscaled, they saturate the softmax into a one-hot from the first step, see
  ``slice_attention`` in ``blocks.py``; a temperature T below 1 (``attention_temperature``) and a
  non-zero starting alpha (``alpha_init``) keep the attention from going flat in training (see
  ``RecurrentSliceAttention``);
* axis order: AttnSeg's model frame is reoriented (k, j, i) = (D, H, W), so sagittal slices are
  indexed by W, coronal by H, axial by D;
* widths: the paper gives none; defaults (8, 16, 32, 64) give 357,113 parameters (1.4 MB) at
  1 modality / 3 classes with placement "101" (363,254 for "010", 369,596 for "111").
"""
from __future__ import annotations

import torch
from torch import nn

from .base import SegmentationNetwork, SegOutput
from .blocks import DoubleConv, RecurrentSliceAttention, UpConv, segmentation_head
from .registry import register_model

POSITIONS = ("encoder", "bottom", "decoder")


def received_attention(attention: torch.Tensor, shape, dim: int) -> torch.Tensor:
    """Per-voxel summary of a slice-attention matrix: mean_i A[n, i, j] broadcast over slice j.

    attention (N, S, S); ``shape`` the (D, H, W) of the attended volume, ``dim`` its slice axis in
    (N, C, D, H, W) (2, 3 or 4; shape[dim - 2] == S). Returns (N, 1, D, H, W) in [0, 1].
    """
    received = attention.mean(dim=1)                                    # (N, S)
    view = [received.shape[0], 1, 1, 1, 1]
    view[dim] = received.shape[1]
    return received.view(view).expand(received.shape[0], 1, *shape)


@register_model("rsanet")
class RSANet(SegmentationNetwork):
    """RSANet; see the module docstring for data flow, shapes and choices.

    Kwargs: ``features`` (widths per level, at least two levels), ``placement`` ("010", "101",
    "111" or any other three 0/1 characters: encoder second-bottom, bottom, decoder second-bottom),
    ``scaled_attention`` (divide the slice dot products by sqrt(C*H*W)), ``alpha_init`` (the alphas'
    starting value, default 0), ``attention_temperature`` (T of the scaled softmax, default 1; see
    ``RecurrentSliceAttention`` for why the shipped package uses alpha_init 1 and T 0.1), ``norm``,
    ``act``.
    """

    def __init__(self, in_channels: int, num_classes: int, features=(8, 16, 32, 64), placement: str = "101",
                 scaled_attention: bool = True, alpha_init: float = 0.0, attention_temperature: float = 1.0,
                 norm: str = "instance", act: str = "leaky_relu"):
        super().__init__()
        features = tuple(int(f) for f in features)
        placement = str(placement)
        if len(features) < 2:
            raise ValueError(f"RSANet needs at least two levels, got features={features}")
        if len(placement) != 3 or set(placement) - {"0", "1"} or "1" not in placement:
            raise ValueError(f"placement must be three 0/1 characters with at least one 1 (encoder "
                             f"second-bottom, bottom, decoder second-bottom; the paper's 010, 101, 111), "
                             f"got {placement!r}")
        self.divisor = 2 ** (len(features) - 1)
        self.placement = placement
        self.encoder = nn.ModuleList(
            DoubleConv(in_channels if i == 0 else features[i - 1], f, stride=1 if i == 0 else 2, norm=norm, act=act)
            for i, f in enumerate(features)
        )
        self.up = nn.ModuleList(UpConv(features[i + 1], features[i]) for i in reversed(range(len(features) - 1)))
        self.decoder = nn.ModuleList(
            DoubleConv(2 * features[i], features[i], norm=norm, act=act) for i in reversed(range(len(features) - 1))
        )
        self.head = segmentation_head(features[0], num_classes)
        widths = (features[-2], features[-1], features[-2])
        self.rsa = nn.ModuleDict({
            position: RecurrentSliceAttention(width, scaled_attention, alpha_init, attention_temperature)
            for position, width, on in zip(POSITIONS, widths, placement) if on == "1"
        })

    def map_descriptions(self) -> dict[str, str]:
        read = ("attention each {axis} slice receives from the other {axis} slices (column mean of the "
                "slice-attention matrix of the last RSA block), in [0, 1], constant over a slice; "
                "1/(number of slices) is uniform, higher slices are the ones the network draws context from")
        return {f"slice_attention.{axis}": read.format(axis=axis) for axis, _ in RecurrentSliceAttention.AXES}

    def map_units(self) -> dict[str, str]:
        return {f"slice_attention.{axis}": "share of the attention a slice receives (uniform: 1 / slices)"
                for axis, _ in RecurrentSliceAttention.AXES}

    def _attend(self, position: str, h: torch.Tensor, matrices: dict, maps: dict) -> torch.Tensor:
        if position not in self.rsa:
            return h
        h, attentions = self.rsa[position](h)
        for axis, dim in RecurrentSliceAttention.AXES:
            matrices[f"slice_attention.{position}.{axis}"] = attentions[axis]
            maps[f"slice_attention.{axis}"] = received_attention(attentions[axis], h.shape[2:], dim)
        return h

    def forward(self, x: torch.Tensor) -> SegOutput:
        self.check_input(x)
        matrices, maps = {}, {}
        second = len(self.encoder) - 2
        skips = []
        h = x
        for level, block in enumerate(self.encoder):
            h = block(h)
            if level == second:
                h = self._attend("encoder", h, matrices, maps)
            skips.append(h)
        h = self._attend("bottom", skips.pop(), matrices, maps)
        for step, (up, block) in enumerate(zip(self.up, self.decoder)):
            h = block(torch.cat([up(h), skips.pop()], dim=1))
            if step == 0:
                h = self._attend("decoder", h, matrices, maps)
        return SegOutput(self.head(h), maps, matrices if self.training else {})
