"""Building blocks shared by every AttnSeg network (3D, channels-first: (N, C, D, H, W)).

Paper-specific attention blocks live here too once more than one network uses them; each block's
docstring names its equation and gives tensor shapes.
"""
from __future__ import annotations

import torch
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


class SqueezeExcitation(nn.Module):
    """Channel attention by squeeze-and-excitation (Hu et al., CVPR 2018).

    ``s = sigmoid(W2 relu(W1 mean_S(x)))``, ``y = x * s`` with W1: C -> C/r, W2: C/r -> C
    (1x1x1 convs). (N, C, D, H, W) -> (N, C, D, H, W); ``channel_weights(x)`` gives s as (N, C).
    The hidden width is ``max(C // reduction, min_hidden)`` so narrow layers keep a usable bottleneck.
    """

    def __init__(self, channels: int, reduction: int = 4, min_hidden: int = 4):
        super().__init__()
        hidden = max(channels // reduction, min_hidden)
        self.squeeze = nn.AdaptiveAvgPool3d(1)
        self.excite = nn.Sequential(
            nn.Conv3d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv3d(hidden, channels, 1), nn.Sigmoid()
        )

    def channel_weights(self, x: torch.Tensor) -> torch.Tensor:
        return self.excite(self.squeeze(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excite(self.squeeze(x))


def full_precision(device: torch.device):
    """Context with autocast off on ``device``, for attention products that sum over all voxels:
    in float16 a channel Gram matrix overflows and softmax weights ~1/S underflow. (Meta tensors,
    used to count FLOPs, have no autocast of their own.)"""
    return torch.autocast("cpu" if device.type == "meta" else device.type, enabled=False)


class DensePositionAttention(nn.Module):
    """Dense spatial position attention, DSPA (MDA-U-Net, Wang et al., Eq. 9-11), in 3D.

    With the input reshaped to M (C x S), S = D*H*W voxels:

    * dense features D (C x K) = M softmax_S(conv(M) / tau)^T: a dilated 3x3x3 conv gives K assignment
      maps; each is normalised over the S voxels and pools M into one C-vector D_k;
    * a_{j,k} = exp(D_k . M_j) / sum_k' exp(D_k' . M_j)  (Eq. 10), the attention of voxel j on dense
      feature k;
    * O_j = sum_k a_{j,k} D_k + M_j  (Eq. 11).

    ``forward``: (N, C, D, H, W) -> (O (N, C, D, H, W), A (N, K, D, H, W)); A is in [0, 1] and sums
    to 1 over K at every voxel. Cost is O(S K C), linear in S, against O(S^2 C) for a non-local block.

    Choices where the paper is open: how "a dilated convolution block" turns M (C x S) into D (C x K)
    is not given; a conv to K softmax-over-space maps that pool M is the reading that yields C x K
    features lying in M's own feature space (needed for the dot products of Eq. 10) for any input size.
    Eq. 10 writes the normalising sum over N positions, but A is S x K, so the softmax runs over the
    K dense features, as in the index of a_{j,i}. Dot products are unscaled, as in Eq. 10. The
    products run in float32 even under autocast (see ``full_precision``); O has the input's dtype.

    ``assignment_temperature`` tau (default 1, the paper's plain softmax): over S ~ 10^5 voxels of a 3D
    patch, logits of order 1 give K assignment maps that are all close to 1/S, so every D_k is close to
    the mean of M, the K dense features are alike and A stays near 1/K everywhere (measured on the
    package trained with tau = 1: normalised entropy 1.00 for 9 of its 10 maps). tau < 1 sharpens the
    spatial softmax so that the dense features can pool distinct regions. Measured on the 40 validation
    cases: trained from scratch at tau = 0.2 (1250 iterations), the maps varied 6-70x more but Dice fell
    (0.8778 -> 0.8740); the shipped package instead continues the tau = 1 weights for 1500 iterations
    at tau = 0.2 (``model.warm_start``): Dice 0.8821 against 0.8778 (paired p = 0.037), the largest of
    the K weights 0.157 per voxel against 0.121 (uniform: 0.100), each map's variation 0.14-0.43
    against 0.05-0.42.
    """

    def __init__(self, channels: int, dense_features: int = 10, dilation: int = 2,
                 assignment_temperature: float = 1.0):
        super().__init__()
        if dense_features < 1:
            raise ValueError(f"dense_features (K) must be at least 1, got {dense_features}")
        if not assignment_temperature > 0:
            raise ValueError(f"assignment_temperature must be above 0, got {assignment_temperature}")
        self.assign = nn.Conv3d(channels, dense_features, 3, padding=dilation, dilation=dilation)
        self.assignment_temperature = float(assignment_temperature)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.assign(x)
        with full_precision(x.device):
            m = x.flatten(2).float()                                            # (N, C, S)
            assignment = torch.softmax(logits.flatten(2).float() / self.assignment_temperature, dim=2)  # (N, K, S)
            dense = m @ assignment.transpose(1, 2)                              # (N, C, K)
            attention = torch.softmax(dense.transpose(1, 2) @ m, dim=1)         # (N, K, S)
            out = dense @ attention + m                                         # (N, C, S)
        return out.view(x.shape).to(x.dtype), attention.view(x.shape[0], -1, *x.shape[2:])


class ChannelSelfAttention(nn.Module):
    """Channel self-attention (DANet's channel attention; MDA-U-Net, Eq. 12-13), no parameters.

    With the input reshaped to M' (C x S): a'_{j,i} = softmax_i(M'_j . M'_i / S) (C x C),
    O'_j = sum_i a'_{j,i} M'_i + M'_j. ``forward``: (N, C, D, H, W) -> (O' (N, C, D, H, W),
    A' (N, C, C), rows summing to 1).

    Choice: the channel Gram matrix is divided by S (a mean over voxels instead of a sum). With a sum,
    3D patches (S ~ 10^5) saturate the softmax into a one-hot that passes no gradient, and its
    sharpness would change with the patch size used at inference. The products run in float32 even
    under autocast (see ``full_precision``); O' has the input's dtype.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with full_precision(x.device):
            m = x.flatten(2).float()                                            # (N, C, S)
            attention = torch.softmax(m @ m.transpose(1, 2) / m.shape[2], dim=2)  # (N, C, C)
            out = attention @ m + m
        return out.view(x.shape).to(x.dtype), attention


class FactorisedSpatialAttention(nn.Module):
    """Spatial attention from three pairs of factorised convs (DAM-AL, Hoang et al. 2022, Eq. 1).

    ``F_1 = conv2(conv1(F))``, ``F_2 = conv4(conv3(F))``, ``F_3 = conv6(conv5(F))``,
    ``F_sa = sigmoid(F_1 + F_2 + F_3)``, ``F_L = F_sa * F`` with the kernels, in the paper's order,
    1xKxK then Kx1x1, Kx1xK then 1xKx1, KxKx1 then 1x1xK: each pair spans a KxKxK neighbourhood with
    ~3K^2 instead of K^3 weights per channel pair, and the three pairs cover the three planes.

    ``forward``: (N, C, D, H, W) -> (F_L (N, C, D, H, W), F_sa (N, 1, D, H, W) in (0, 1)).

    Choices where the paper is open (the authors' code settles the first two): the first conv of each
    pair maps C -> C/2 channels and is followed by norm and activation, the second maps to 1 channel;
    K = 9. The second conv has no norm or activation: the authors' code puts a ReLU there, which
    holds every map above sigmoid(0) = 0.5, so no voxel could ever be suppressed.
    """

    def __init__(self, channels: int, kernel_size: int = 9, norm: str = "instance", act: str = "leaky_relu"):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size (K) must be a positive odd number, got {kernel_size}")
        k = kernel_size
        pairs = (((1, k, k), (k, 1, 1)), ((k, 1, k), (1, k, 1)), ((k, k, 1), (1, 1, k)))
        hidden = max(channels // 2, 1)
        self.branches = nn.ModuleList(
            nn.Sequential(
                ConvNormAct(channels, hidden, first, norm=norm, act=act),
                nn.Conv3d(hidden, 1, second, padding=tuple(s // 2 for s in second)),
            )
            for first, second in pairs
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention = torch.sigmoid(sum(branch(x) for branch in self.branches))
        return x * attention, attention


def slice_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dim: int, scaled: bool = True,
                    temperature: float = 1.0):
    """Attention between the slices of a volume along spatial ``dim`` (RSANet, Eq. 1 and the product
    of Eq. 2), without the residual sum.

    ``query``, ``key``, ``value``: (N, C, D, H, W); with S the size of ``dim`` and each slice
    flattened to an L = C*(other two sizes) vector: A = softmax_j(Q_i . K_j / (T sqrt(L))) (N, S, S),
    rows summing to 1, A[n, i, j] the weight slice j carries in the new slice i; out = RT(A V),
    (N, C, D, H, W). ``scaled=False`` drops the 1/sqrt(L), as Eq. 1 is written; ``temperature`` T
    (default 1) sharpens the scaled softmax below 1.

    Choice: Eq. 1 has no scale, but its dot products run over L = C*H*W elements (hundreds to
    thousands); unscaled, the softmax is one-hot from the first step (normalised row entropy
    0.01-0.34 at initialisation on a hippocampus patch, against 0.98-1.0 scaled), which passes no
    gradient to the query and key convs. Dividing by sqrt(L) is the scaled dot-product attention of
    Vaswani et al., the self-attention RSANet builds on. The products run in float32 even under
    autocast (``full_precision``: sums over C*H*W overflow float16); out has the value's dtype.
    """
    if dim not in (2, 3, 4):
        raise ValueError(f"dim must be a spatial axis of (N, C, D, H, W), 2, 3 or 4; got {dim}")
    n, slices = value.shape[0], value.shape[dim]

    def as_slices(t: torch.Tensor) -> torch.Tensor:  # (N, S, L)
        return t.movedim(dim, 1).reshape(n, slices, -1)

    with full_precision(value.device):
        q, k = as_slices(query).float(), as_slices(key).float()
        logits = q @ k.transpose(1, 2)
        attention = torch.softmax(logits / (temperature * q.shape[2] ** 0.5) if scaled else logits, dim=2)
        out = attention @ as_slices(value).float()
    moved = value.movedim(dim, 1)
    return out.view(moved.shape).movedim(1, dim).to(value.dtype), attention


class RecurrentSliceAttention(nn.Module):
    """Recurrent slice-wise attention, RSA block (RSANet, Zhang et al. MICCAI 2019, Eq. 1-2, Fig. 3).

    Three SA blocks in a chain, sagittal -> coronal -> axial: ``M' = alpha_s RT(A M_3) + M`` along the
    sagittal axis, then the same on M' coronally and on M'' axially, giving E. The three SA blocks
    share the 1x1x1 convs that form M_2 (query), M_1 (key) and M_3 (value) from their input (C -> C,
    so the dot products run over C*H*W as in Eq. 1; scaled by 1/sqrt(C*H*W) unless ``scaled=False``,
    see ``slice_attention``, and by ``temperature``); each axis has its own learnable alpha, starting
    at ``alpha_init`` (default 0: the block starts as the identity).

    Why the options: at alpha = 0 the query and key convs get no gradient from the loss, and Adam's
    coupled weight decay (the paper's Adam, weight decay 1e-5) alone then drives them toward zero at
    the full learning rate, so the softmax goes flat (row entropy 1.000 of log S in the shipped
    encoder block) and alpha never learns that the attended slices help. Starting alpha at 1 and the
    softmax at temperature 0.1 (row entropy ~0.5-0.6 of log S at initialisation, against 0.99 at 1)
    lets the attention train from the first step; Eq. 1-2 are unchanged.

    Axes of (N, C, D, H, W) in the model frame (i, j, k = W, H, D after reorientation): sagittal
    slices are indexed by W, coronal by H, axial by D.

    ``forward``: (N, C, D, H, W) -> (E (N, C, D, H, W), {"sagittal": A (N, W, W), "coronal":
    A (N, H, H), "axial": A (N, D, D)}), each A with rows summing to 1.
    """

    AXES = (("sagittal", 4), ("coronal", 3), ("axial", 2))

    def __init__(self, channels: int, scaled: bool = True, alpha_init: float = 0.0, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"the slice-attention temperature must be > 0, got {temperature}")
        self.scaled = scaled
        self.temperature = float(temperature)
        self.query = nn.Conv3d(channels, channels, 1)
        self.key = nn.Conv3d(channels, channels, 1)
        self.value = nn.Conv3d(channels, channels, 1)
        self.alpha = nn.Parameter(torch.full((len(self.AXES),), float(alpha_init)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        attentions = {}
        for alpha, (name, dim) in zip(self.alpha, self.AXES):
            out, attentions[name] = slice_attention(self.query(x), self.key(x), self.value(x), dim, self.scaled,
                                                     self.temperature)
            x = alpha * out + x
        return x, attentions
