"""MDA-U-Net (omega-Net, Wang et al.): U-Net with an additional expansive path for dual supervision,
multi-dimensional self-attention between the two expansive paths and cascade multi-scale convolution
on the skips. The paper is 2D; this is its 3D version.

Data flow, levels 0 (full resolution) .. L-1 (bottleneck), L = ``depth``, w_l = base_features * 2**l:

* contracting path (Eq. 1): E_0 = Conv_2(X), E_l = Conv_2(MaxPool(E_{l-1})), Conv_2 two 3x3x3 convs;
* skips: S_l = CascadeMSC(E_l) (Eq. 14) for l < L-1;
* additional expansive path (Eq. 2-3): A_{L-2} = [TransConv(E_{L-1}), S_{L-2}], then
  A_l = [TransConv(Conv_2(A_{l+1})), S_l]; its coarse segmentation is a 1x1x1 conv on Conv_2(A_0)
  (Eq. 6's Conv_{64 x L} on the finest features);
* multi-dimensional self-attention on each A_l (Eq. 9-13): dense spatial position attention with K
  dense features, then channel self-attention, giving the attentive features T_l;
* original expansive path (Eq. 4-5): O_{L-2} = [TransConv(E_{L-1}), T_{L-2}], then
  O_l = [TransConv(Conv_2(O_{l+1})), T_l]; logits = 1x1x1 conv on Conv_2(O_0).

``forward(x (N, M, D, H, W)) -> SegOutput``: ``logits`` (N, C, D, H, W);
``maps["position_attention"]`` (N, K, D, H, W): the dense spatial attention A of the finest level
(Eq. 10), in [0, 1] and summing to 1 over the K dense features at each voxel (channel k: how much
voxel j draws on dense feature k); ``maps["coarse_segmentation"]`` (N, C, D, H, W): softmax of the
additional path's logits; ``aux["coarse_logits"]`` (N, C, D, H, W) in training mode, for the dual
supervision loss (``training/losses/mda_unet.py``).

3D adaptation and choices where the paper is open:

* every 2D conv becomes 3D with the same kernel (Cascade MSC keeps 5x5x5, 3x3x3, 1x1x1; each conv
  is conv-norm-act, the paper does not say); max pooling and transposed convs stride 2 on all axes;
* widths: paper 64..1024 over five levels; here ``base_features`` (8) doubling over ``depth`` (4)
  levels, so the network ships near 3 MB and trains on a CPU;
* each expansive stage is the U-Net backbone's: concatenation, two 3x3x3 convs, then the transposed
  conv (Eq. 3 and 5 show only the transposed conv; the paper's backbone is a U-Net with 3x3 decoder
  convs of widths 1024..64);
* the two expansive paths have their own transposed convs from the bottleneck (Eq. 2 and 4);
* MDSA sits on every skip between the two paths (Fig. 1 is not in the text; the paper says MDSA is
  added on "all feature maps that are sent to the original expansive path");
* dense features and the 3D scaling of the attention products: see ``DensePositionAttention`` and
  ``ChannelSelfAttention`` in ``blocks.py``; K = ``dense_features`` (paper: 10).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import SegmentationNetwork, SegOutput
from .blocks import ChannelSelfAttention, ConvNormAct, DensePositionAttention, DoubleConv, UpConv, segmentation_head
from .registry import register_model


class CascadeMultiScaleConv(nn.Module):
    """Cascade multi-scale convolution (Eq. 14), in 3D; (N, C, D, H, W) -> (N, C, D, H, W).

    X1 = Conv5(X), X2 = Conv3(X + X1), X3 = Conv1(X + X2), Y = Conv1([X, X1, X2, X3]); each conv is a
    conv-norm-act keeping C channels.
    """

    def __init__(self, channels: int, norm: str = "instance", act: str = "leaky_relu"):
        super().__init__()
        self.conv5 = ConvNormAct(channels, channels, 5, norm=norm, act=act)
        self.conv3 = ConvNormAct(channels, channels, 3, norm=norm, act=act)
        self.conv1 = ConvNormAct(channels, channels, 1, norm=norm, act=act)
        self.fuse = ConvNormAct(4 * channels, channels, 1, norm=norm, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv5(x)
        x2 = self.conv3(x + x1)
        x3 = self.conv1(x + x2)
        return self.fuse(torch.cat([x, x1, x2, x3], dim=1))


class MultiDimensionalSelfAttention(nn.Module):
    """MDSA: dense spatial position attention (Eq. 9-11) then channel self-attention (Eq. 12-13).
    (N, C, D, H, W) -> (attentive features (N, C, D, H, W), position attention (N, K, D, H, W))."""

    def __init__(self, channels: int, dense_features: int = 10, dilation: int = 2,
                 assignment_temperature: float = 1.0):
        super().__init__()
        self.position = DensePositionAttention(channels, dense_features, dilation, assignment_temperature)
        self.channel = ChannelSelfAttention()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, position_attention = self.position(x)
        x, _ = self.channel(x)
        return x, position_attention


@register_model("mda_unet")
class MDAUNet(SegmentationNetwork):
    """MDA-U-Net in 3D; see the module docstring for shapes and choices.

    kwargs: ``base_features`` (width at full resolution, doubled per level), ``depth`` (resolution
    levels, >= 2; ``divisor`` = 2**(depth-1)), ``dense_features`` (K of the position attention,
    paper: 10), ``position_dilation`` (dilation of the conv that forms the dense features),
    ``assignment_temperature`` (tau of the dense features' spatial softmax, default 1; see
    ``DensePositionAttention``), ``norm``, ``act``.
    """

    class_channel_maps = ("coarse_segmentation",)

    def __init__(self, in_channels: int, num_classes: int, base_features: int = 8, depth: int = 4,
                 dense_features: int = 10, position_dilation: int = 2, assignment_temperature: float = 1.0,
                 norm: str = "instance", act: str = "leaky_relu"):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be at least 2 (one skip between the paths), got {depth}")
        if base_features < 1:
            raise ValueError(f"base_features must be at least 1, got {base_features}")
        widths = [base_features * 2**level for level in range(depth)]
        self.divisor = 2 ** (depth - 1)
        self.dense_features = dense_features
        self.pool = nn.MaxPool3d(2)
        self.encoder = nn.ModuleList(
            DoubleConv(in_channels if level == 0 else widths[level - 1], width, norm=norm, act=act)
            for level, width in enumerate(widths)
        )
        skip_levels = range(depth - 1)
        self.skip_msc = nn.ModuleList(CascadeMultiScaleConv(widths[i], norm, act) for i in skip_levels)
        self.attention = nn.ModuleList(
            MultiDimensionalSelfAttention(2 * widths[i], dense_features, position_dilation, assignment_temperature)
            for i in skip_levels
        )
        self.up_additional = nn.ModuleList(UpConv(widths[i + 1], widths[i]) for i in skip_levels)
        self.up_original = nn.ModuleList(UpConv(widths[i + 1], widths[i]) for i in skip_levels)
        self.decoder_additional = nn.ModuleList(DoubleConv(2 * widths[i], widths[i], norm=norm, act=act)
                                                for i in skip_levels)
        self.decoder_original = nn.ModuleList(DoubleConv(3 * widths[i], widths[i], norm=norm, act=act)
                                              for i in skip_levels)
        self.head_additional = segmentation_head(widths[0], num_classes)
        self.head = segmentation_head(widths[0], num_classes)

    def map_descriptions(self) -> dict[str, str]:
        return {
            "position_attention": f"Dense spatial position attention of the finest level, one channel per "
                                  f"dense feature (K = {self.dense_features}); at each voxel the K values sum "
                                  "to 1 and show which learned region prototype the voxel draws on (above "
                                  f"1/{self.dense_features}: more than on average).",
            "coarse_segmentation": "Class probabilities of the additional expansive path (the coarse "
                                   "segmentation the final path refines), one channel per class, in [0, 1]: "
                                   "high where the coarse path places that class.",
        }

    def map_units(self) -> dict[str, str]:
        return {"position_attention": f"weight of a dense feature (uniform: 1 / {self.dense_features})",
                "coarse_segmentation": "probability"}

    def forward(self, x: torch.Tensor) -> SegOutput:
        self.check_input(x)
        features = []
        for level, block in enumerate(self.encoder):
            x = block(self.pool(x) if level else x)
            features.append(x)
        bottom = features.pop()
        additional, original = bottom, bottom
        for level in reversed(range(len(features))):
            merged = torch.cat([self.up_additional[level](additional), self.skip_msc[level](features[level])], dim=1)
            attentive, position_attention = self.attention[level](merged)
            additional = self.decoder_additional[level](merged)
            original = self.decoder_original[level](torch.cat([self.up_original[level](original), attentive], dim=1))
        coarse_logits = self.head_additional(additional)
        maps = {"position_attention": position_attention, "coarse_segmentation": torch.softmax(coarse_logits, dim=1)}
        aux = {"coarse_logits": coarse_logits} if self.training else {}
        return SegOutput(self.head(original), maps, aux)
