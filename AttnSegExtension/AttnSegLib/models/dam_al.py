"""DAM-AL (Hoang, Diep, Tran, Le; SAC 2022): dilated attention network with hard-case attention loss.

Data flow, levels 1..L (L = ``len(features)``, the paper's five), F_l the encoder output of level l
with ``features[l-1]`` channels at 1/2**(l-1) of the input size:

* encoder: a residual ("skip") block per level, strided by 2 from level 2 on (U-Net contracting path);
* low levels 1 and 2: spatial attention (Eq. 1, ``FactorisedSpatialAttention``): F_L = F_sa * F_l;
  each F_L is projected to ``fuse_features`` by a 3x3x3 conv, level 2 is upsampled to level 1 and
  both are fused by a 3x3x3 conv into the low-level feature;
* high levels 3..L: an atrous block (3x3x3 conv-norm-act at dilations 1, 2, 3, 4, each giving
  ``atrous_features`` channels, concatenated) forms F_h, then channel attention (Eq. 2,
  ``SqueezeExcitation``): F_H = F_ca * F_h; the F_H are upsampled to level 3, concatenated, fused
  by a 1x1x1 conv and upsampled to level 1 (trilinear, then a 3x3x3 conv) into the high-level feature;
* head: concatenated low- and high-level features -> 3x3x3 conv-norm-act -> 1x1x1 conv to classes.

Instance norm and leaky ReLU throughout, as in the paper (Sec. 3.2).

``forward(x (N, M, D, H, W)) -> SegOutput``, D, H, W divisible by 2**(L-1) (16 at L = 5):

* ``logits`` (N, C, D, H, W);
* ``maps["spatial_attention.level1"]`` (N, 1, D, H, W), ``maps["spatial_attention.level2"]``
  (N, 1, D/2, H/2, W/2): F_sa in (0, 1); near 1 where the low-level features are kept;
* ``aux["channel_weights.level{l}"]`` (N, 4 * atrous_features) for l = 3..L in training mode: F_ca
  in (0, 1). They are not spatial, so they are not maps; ``last_channel_weights()`` returns those of
  the latest forward pass in any mode.

The hard-case attention loss (Eq. 6-7) is ``training/losses/dam_al.py``; its surface weight map
W = 1/(d + 1) is ``surface_weight_map`` here. W needs a reference label, so it is a training weight,
not a map of a prediction: no front end shows it, nor the channel weights.

Choices where the paper is open (its Fig. 1-3 are not in the text; the authors' code,
DinhHieuHoang/DAM-CA-InfantBrain, was read for the layout):

* fusion: the paper names low- and high-level features and weights them, but the decoder is only in
  Fig. 1; the authors' code fuses them as above (pyramid-feature-attention style, one full-resolution
  head), so this network does too, with trilinear instead of nearest upsampling;
* spatial attention per low level, computed from F_l itself (Eq. 1 and the text); the authors' code
  instead computes one map from the fused high-level feature and applies it to the fused low levels;
* channel attention per high level on its own atrous output (Eq. 2, "F_h ... at a high-level
  layer"); the code applies one CA to the three levels concatenated. Per-level weights also let a
  report show which dilations each level relies on. Reduction 4 in the FC bottleneck, as in the code;
* dilations 1, 2, 3, 4 as the paper says (the code uses a 1x1x1 conv and dilations 3, 5, 7);
* widths: the paper gives none; the code uses 16 doubling per level with 64- and 128-channel fusion.
  Defaults here (8, 16, 32, 48, 64), 8 per atrous branch and 16 for fusion give 569,517 parameters
  (2.3 MB of float32 weights) at 1 modality / 3 classes, for CPU training on small patches.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from .base import SegmentationNetwork, SegOutput
from .blocks import ConvNormAct, FactorisedSpatialAttention, ResidualBlock, SqueezeExcitation, segmentation_head
from .registry import register_model

LOW_LEVELS = 2


def surface_weight_map(label: np.ndarray, num_classes: int, spacing=None) -> np.ndarray:
    """Surface attention weight map of DAM-AL, Eq. (6): W^c_i = 1 / (min_{j in T^c} d(i, j) + 1).

    ``label``: (D, H, W) integer classes. Returns (num_classes, D, H, W) float32 in (0, 1].

    T^c, the surface of class c, is the set of voxels of class c with a face neighbour of another
    class; d is the Euclidean distance (in voxels, or in mm with ``spacing`` in (D, H, W) order).
    The edge of the array is not a surface: a crop cuts structures, it does not bound them. A class
    with no voxel has no surface; its map is 1 everywhere, as in the authors' code, so predicting
    that class anywhere costs full weight.
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label must be a (D, H, W) array, got shape {label.shape}")
    weights = np.ones((num_classes, *label.shape), dtype=np.float32)
    face_neighbours = ndimage.generate_binary_structure(3, 1)
    for c in range(num_classes):
        mask = label == c
        if not mask.any():
            continue
        surface = mask & ~ndimage.binary_erosion(mask, face_neighbours, border_value=1)
        distance = ndimage.distance_transform_edt(~surface, sampling=spacing)
        weights[c] = 1.0 / (distance + 1.0)
    return weights


class AtrousBlock(nn.Module):
    """Parallel 3x3x3 conv-norm-act at several dilations, concatenated (DAM-AL's atrous block).

    (N, C_in, D, H, W) -> (N, len(dilations) * out_per_branch, D, H, W).
    """

    def __init__(self, in_ch: int, out_per_branch: int, dilations=(1, 2, 3, 4), norm="instance", act="leaky_relu"):
        super().__init__()
        self.branches = nn.ModuleList(
            ConvNormAct(in_ch, out_per_branch, 3, dilation=d, norm=norm, act=act) for d in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)


@register_model("dam_al")
class DamAl(SegmentationNetwork):
    """DAM-AL network; see the module docstring for the data flow, shapes and choices.

    Kwargs: ``features`` (widths of the L >= 3 encoder levels; the first two are low-level),
    ``spatial_kernel`` (K of Eq. 1), ``dilations`` (atrous rates), ``atrous_features`` (channels per
    atrous branch), ``reduction`` (channel-attention bottleneck), ``fuse_features`` (width of the fused
    low/high features), ``norm``, ``act``.
    """

    def __init__(self, in_channels: int, num_classes: int, features=(8, 16, 32, 48, 64), spatial_kernel: int = 9,
                 dilations=(1, 2, 3, 4), atrous_features: int = 8, reduction: int = 4, fuse_features: int = 16,
                 norm: str = "instance", act: str = "leaky_relu"):
        super().__init__()
        features = tuple(int(f) for f in features)
        if len(features) <= LOW_LEVELS:
            raise ValueError(f"DAM-AL needs at least {LOW_LEVELS + 1} levels (two low, one or more high), "
                             f"got features={features}")
        self.divisor = 2 ** (len(features) - 1)
        self.encoder = nn.ModuleList(
            ResidualBlock(in_channels if i == 0 else features[i - 1], f, stride=1 if i == 0 else 2, norm=norm, act=act)
            for i, f in enumerate(features)
        )
        self.spatial_attention = nn.ModuleList(
            FactorisedSpatialAttention(f, spatial_kernel, norm, act) for f in features[:LOW_LEVELS]
        )
        self.low_projection = nn.ModuleList(
            ConvNormAct(f, fuse_features, 3, norm=norm, act=act) for f in features[:LOW_LEVELS]
        )
        self.low_fusion = ConvNormAct(LOW_LEVELS * fuse_features, fuse_features, 3, norm=norm, act=act)

        high_width = len(dilations) * atrous_features
        self.atrous = nn.ModuleList(
            AtrousBlock(f, atrous_features, dilations, norm, act) for f in features[LOW_LEVELS:]
        )
        self.channel_attention = nn.ModuleList(
            SqueezeExcitation(high_width, reduction) for _ in features[LOW_LEVELS:]
        )
        self.high_fusion = ConvNormAct(len(self.atrous) * high_width, fuse_features, 1, norm=norm, act=act)
        self.high_refine = ConvNormAct(fuse_features, fuse_features, 3, norm=norm, act=act)

        self.fusion = ConvNormAct(2 * fuse_features, fuse_features, 3, norm=norm, act=act)
        self.head = segmentation_head(fuse_features, num_classes)
        self._last_channel_weights: dict[str, torch.Tensor] = {}

    def map_descriptions(self) -> dict[str, str]:
        read = ("spatial attention F_sa of encoder level {l} (Eq. 1), in (0, 1): near 1 where the "
                "network keeps the level-{l} features (structure, surfaces), near 0 where it suppresses them")
        return {f"spatial_attention.level{l}": read.format(l=l) for l in range(1, LOW_LEVELS + 1)}

    def map_units(self) -> dict[str, str]:
        return {f"spatial_attention.level{l}": "gate (1 = features kept, 0 = suppressed)"
                for l in range(1, LOW_LEVELS + 1)}

    def last_channel_weights(self) -> dict[str, torch.Tensor]:
        """Channel weights F_ca (Eq. 2) of the latest forward pass: ``channel_weights.level{l}`` ->
        (N, len(dilations) * atrous_features) in (0, 1), channels grouped by dilation in the order
        of ``dilations``."""
        return dict(self._last_channel_weights)

    def forward(self, x: torch.Tensor) -> SegOutput:
        self.check_input(x)
        levels = []
        for block in self.encoder:
            x = block(x)
            levels.append(x)

        maps, low = {}, []
        for i, (attend, project) in enumerate(zip(self.spatial_attention, self.low_projection)):
            attended, maps[f"spatial_attention.level{i + 1}"] = attend(levels[i])
            low.append(_resize(project(attended), levels[0].shape[2:]) if i else project(attended))
        low_feature = self.low_fusion(torch.cat(low, dim=1))

        weights, high = {}, []
        for i, (atrous, attend) in enumerate(zip(self.atrous, self.channel_attention)):
            f_h = atrous(levels[LOW_LEVELS + i])
            f_ca = attend.channel_weights(f_h)
            weights[f"channel_weights.level{LOW_LEVELS + i + 1}"] = f_ca
            f_high = f_h * f_ca[:, :, None, None, None]
            high.append(_resize(f_high, levels[LOW_LEVELS].shape[2:]) if i else f_high)
        high_feature = self.high_refine(_resize(self.high_fusion(torch.cat(high, dim=1)), levels[0].shape[2:]))

        logits = self.head(self.fusion(torch.cat([low_feature, high_feature], dim=1)))
        self._last_channel_weights = {name: w.detach() for name, w in weights.items()}
        return SegOutput(logits, maps, weights if self.training else {})
