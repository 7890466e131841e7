"""Building blocks shared by every AttnSeg network (3D, channels-first: (N, C, D, H, W)).

Paper-specific attention blocks live here too once more than one network uses them; each block's
docstring names its equation and gives tensor shapes.
"""
from __future__ import annotations

from torch import nn

NORMS = ("instance", "batch", "group")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """Normalisation over (N, C, D, H, W). ``kind``: instance | batch | group (8 groups or fewer)."""
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        groups = min(8, channels)
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown normalisation {kind!r}; choose one of {', '.join(NORMS)}")


def activation(kind: str = "leaky_relu") -> nn.Module:
    if kind == "leaky_relu":
        return nn.LeakyReLU(0.01, inplace=True)
    if kind == "relu":
        return nn.ReLU(inplace=True)
    raise ValueError(f"unknown activation {kind!r}; choose leaky_relu or relu")


class ConvNormAct(nn.Sequential):
    """Conv3d -> norm -> activation. (N, C_in, D, H, W) -> (N, C_out, D/s, H/s, W/s).

    ``kernel_size`` may be an int or a 3-tuple (factorised kernels such as (1, K, K));
    padding keeps the size ("same") for odd kernels and any dilation.
    """

    def __init__(self, in_ch, out_ch, kernel_size=3, stride=1, dilation=1, norm="instance",
                 act="leaky_relu"):
        ks = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        dil = (dilation,) * 3 if isinstance(dilation, int) else tuple(dilation)
        pad = tuple(d * (k - 1) // 2 for k, d in zip(ks, dil))
        super().__init__(
            nn.Conv3d(in_ch, out_ch, ks, stride=stride, padding=pad, dilation=dil, bias=False),
            norm_layer(norm, out_ch),
            activation(act),
        )


class DoubleConv(nn.Sequential):
    """Two 3x3x3 ConvNormAct; the first may stride. (N, C_in, S) -> (N, C_out, S/stride)."""

    def __init__(self, in_ch, out_ch, stride=1, norm="instance", act="leaky_relu"):
        super().__init__(
            ConvNormAct(in_ch, out_ch, 3, stride, norm=norm, act=act),
            ConvNormAct(out_ch, out_ch, 3, norm=norm, act=act),
        )


class ResidualBlock(nn.Module):
    """Pre-addition residual unit: x + F(x) with F two 3x3x3 convs (VoxResNet / nnU-Net style).

    A 1x1x1 strided projection aligns the shortcut when channels or stride change.
    (N, C_in, S) -> (N, C_out, S/stride).
    """

    def __init__(self, in_ch, out_ch, stride=1, dilation=1, norm="instance", act="leaky_relu"):
        super().__init__()
        self.conv1 = ConvNormAct(in_ch, out_ch, 3, stride, dilation, norm, act)
        self.conv2 = nn.Sequential(
            nn.Conv3d(out_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False),
            norm_layer(norm, out_ch),
        )
        self.shortcut = (
            nn.Identity()
            if in_ch == out_ch and stride == 1
            else nn.Sequential(nn.Conv3d(in_ch, out_ch, 1, stride, bias=False), norm_layer(norm, out_ch))
        )
        self.act = activation(act)

    def forward(self, x):
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class UpConv(nn.Sequential):
    """Transposed conv x2 up-sampling: (N, C_in, S) -> (N, C_out, 2S)."""

    def __init__(self, in_ch, out_ch, scale=2):
        super().__init__(nn.ConvTranspose3d(in_ch, out_ch, scale, stride=scale, bias=False))


def segmentation_head(in_ch: int, num_classes: int) -> nn.Conv3d:
    """1x1x1 conv to class logits: (N, in_ch, S) -> (N, num_classes, S)."""
    return nn.Conv3d(in_ch, num_classes, 1)
