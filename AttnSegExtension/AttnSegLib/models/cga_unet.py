"""CGA U-Net (Li, Yu, Chen, Ding, Zha 2021): U-Net with a Supervised Attention Module (SAM).

Network (the paper's Table 1, in 3D; b = ``base_features``, L = ``len(blocks) - 1`` down-samplings,
level l has b * 2**l channels at 1/2**l of the input size):

* encoder: InitConv (3x3x3 conv, channel dropout), then per level ``blocks[l]`` pre-activation
  residual blocks (norm, ReLU, conv3, norm, ReLU, conv3, +), a strided 3x3x3 conv between levels;
* decoder, per level from the bottom: DeUp (1x1x1 conv to the level's width, 2x transposed conv,
  concatenation with the encoder skip, 1x1x1 conv), then one pre-activation residual block;
* EndConv: 1x1x1 conv to the classes (the softmax is the loss's and the predictor's);
* SAM (Sec. 3.2-3.3): the attention conv path, 3x3x3 convs from the *input image* with the first
  log2(r) strided by 2 (r = ``downsampling``), gives the category attention map S (Eq. 6),
  (N, C, D/r, H/r, W/r), supervised by the one-hot label down-sampled by r (MSE, in the loss).
  The feature map X at scale 1/r (the bottleneck for r = 2**L, else the decoder output of that
  level) is updated by the intra-class method: M_k = one-hot(argmax_k S), prototypes
  p_k = sum_i w_i x_i / sum_i w_i (Eq. 7, masked average pooling), Y = sum_k p_k M_k (Eq. 8),
  X <- X + Y. The prototypes also feed the inter-class loss (Eq. 9-10, in the loss).

``forward(x (N, M, D, H, W)) -> SegOutput``, D, H, W divisible by 2**L:

* ``logits`` (N, C, D, H, W);
* ``maps["category_attention"]`` (N, C, D/r, H/r, W/r): S clipped to [0, 1]; channel k is the
  network's estimate of where class k lies (S is trained toward the one-hot label, so ~1 inside
  class k and ~0 elsewhere);
* ``aux`` (training mode): ``category_attention`` raw S (for the MSE), ``class_prototypes``
  (N, C, F) with F the width of the updated level, ``class_voxel_counts`` (N, C), the mask
  weight sum_i w_i of each class (0: class absent from the mask, no prototype).

Parameter counts (``count_parameters``): ``PAPER_CONFIGURATION`` (4 modalities, 4 classes,
``base_features=16, blocks=(1, 2, 2, 4), attention_features=16, downsampling=8``) has 4,768,616
parameters (paper: 4.77 M; the authors' code has 4,768,617, one unused scalar more) and costs
151.6 GMAC on a 4 x 128^3 input (paper: 151.12 GFLOPs, counted as multiply-adds), of which the SAM
path has 10,404 parameters (0.0104 M) and 0.687 GMAC. The paper's Table 3 gives 0.095 M for SAM
at r = 8, which its own Table 1 and 4.77 M total contradict: Table 1's path (16, 16, C_l channels,
three strided 3x3x3 convs) is the 10,404 parameters and 0.687 GMAC above (Table 3: 0.675 GFLOPs),
and 4,758,212 + 95,000 would be 4.85 M. Table 3's 0.095 M needs ``attention_features=55`` (93,669). The defaults here
(``base_features=8, blocks=(1, 2, 2, 2)``: half the widths, two bottleneck blocks instead of four)
have 756,278 parameters (3.0 MB) at 1 modality / 3 classes, 758,664 at 4 / 4.

Choices where the paper is open:

* DeUp convs: Table 1 says Conv3 but the authors' code (delugewalker/CGA-U-Net) uses 1x1x1 convs,
  and only those reproduce the 4.77 M parameters; biases everywhere, as in that code;
* normalisation: Table 1 says BN, the authors' code uses GroupNorm(8), the default here ("group"),
  which also suits the batch sizes of CPU training;
* the attention path: by default as Table 1, no normalisation or activation between its convs
  (Table 1 lists only "Conv3 (stride 2)"; the code has them commented out); for r < 2**3 the path
  keeps three convs with the last ones unstrided, for r > 8 it has log2(r) convs. The paper says the
  path "can be adjusted flexibly", so its depth (``attention_convs``), width
  (``attention_features``) and a norm/activation between its convs (``attention_norm``,
  ``attention_act``; never after the last conv, S stays linear for its MSE) are options:
  (N, M, D, H, W) -> log2(r) strided convs -> (N, F, D/r, H/r, W/r) -> unstrided convs ->
  (N, K, D/r, H/r, W/r). Why: three linear convs are one linear filter of the image, too weak to
  find the hippocampus (trained alone on Task04 they reach a mean S of 0.10 / 0.12 inside their
  class), while six 32-wide convs with GroupNorm and ReLU at r = 2 reach 0.63 / 0.62; and the map's
  resolution caps what any path can reach (the one-hot label itself, resized to 1/8, averages only
  0.23 / 0.18 inside its class at full resolution, 0.55 / 0.47 at 1/4, 0.80 / 0.76 at 1/2);
* masks M_k are hard (arg-max of S, as in the authors' code), so the segmentation loss does not
  reach the attention path, which only its supervision trains (the paper adds the separate path "to
  eliminate conflicts between the two losses"); the regenerated map is added to X, as in the
  authors' code (the paper only says the regenerated maps of all categories are added);
* S is shown clipped to [0, 1] rather than through a softmax: a softmax would change the values the
  MSE trained (a perfect one-hot S would read 0.58 / 0.21 / 0.21 for 3 classes);
* InitConv dropout (p = 0.2, code) is channel dropout, active in training only (the code's
  ``F.dropout3d`` call also drops channels at inference).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import SegmentationNetwork, SegOutput
from .blocks import activation, full_precision, norm_layer
from .registry import register_model

PAPER_CONFIGURATION = dict(in_channels=4, num_classes=4, base_features=16, blocks=(1, 2, 2, 4),
                           attention_features=16, downsampling=8)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class PreActResidualBlock(nn.Module):
    """x + conv3(act(norm(conv3(act(norm(x)))))) keeping C channels (Table 1's EnBlock / DeBlock).
    (N, C, D, H, W) -> (N, C, D, H, W)."""

    def __init__(self, channels: int, norm: str = "group", act: str = "relu"):
        super().__init__()
        self.residual = nn.Sequential(
            norm_layer(norm, channels), activation(act), nn.Conv3d(channels, channels, 3, padding=1),
            norm_layer(norm, channels), activation(act), nn.Conv3d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x)


class UpConcat(nn.Module):
    """Table 1's DeUp: 1x1x1 conv, 2x transposed conv, concatenation with the skip, 1x1x1 conv.
    (N, C_in, S), skip (N, C_out, 2S) -> (N, C_out, 2S)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.reduce = nn.Conv3d(in_ch, out_ch, 1)
        self.up = nn.ConvTranspose3d(out_ch, out_ch, 2, stride=2)
        self.merge = nn.Conv3d(2 * out_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.merge(torch.cat([skip, self.up(self.reduce(x))], dim=1))


def class_prototypes(features: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked average pooling, Eq. 7: p_k = sum_i w_i x_i / sum_i w_i.

    features (N, F, D, H, W), masks (N, K, D, H, W) of weights w >= 0. Returns (prototypes (N, K, F),
    weight sums (N, K)), float32 even under autocast (a sum over all voxels overflows float16); a
    class with zero weight gets a zero prototype.
    """
    with full_precision(features.device):
        weights = masks.flatten(2).float()
        sums = weights.sum(2)                                                  # (N, K)
        weighted = weights @ features.flatten(2).float().transpose(1, 2)       # (N, K, F)
        return weighted / sums.clamp_min(torch.finfo(sums.dtype).eps)[..., None], sums


def regenerate_from_prototypes(prototypes: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Eq. 8 summed over classes: y_i = sum_k M_k,i p_k. prototypes (N, K, F), masks (N, K, D, H, W)
    -> (N, F, D, H, W)."""
    return torch.einsum("nkf,nkdhw->nfdhw", prototypes.to(masks.dtype), masks)


class SupervisedAttentionModule(nn.Module):
    """SAM: attention conv path (Eq. 6) and intra-class update (Eq. 7-8); see the module docstring.

    ``attention_map(image (N, M, D, H, W))`` -> S (N, K, D/r, H/r, W/r).
    ``forward(features (N, F, D/r, H/r, W/r), attention S)`` -> (updated features, prototypes
    (N, K, F), mask weight sums (N, K)).
    """

    def __init__(self, in_channels: int, num_classes: int, downsampling: int = 8, features: int = 16,
                 intra_class_update: bool = True, convs: int | None = None, norm: str | None = None,
                 act: str | None = None):
        super().__init__()
        strided = int(math.log2(downsampling))
        convs = max(3, strided) if convs is None else int(convs)
        if convs < max(2, strided):
            raise ValueError(f"the attention path needs at least max(2, log2(downsampling)) = "
                             f"{max(2, strided)} convs, got {convs}")
        widths = [in_channels] + [features] * (convs - 1) + [num_classes]
        layers = []
        for i in range(convs):
            layers.append(nn.Conv3d(widths[i], widths[i + 1], 3, stride=2 if i < strided else 1, padding=1))
            if i < convs - 1:  # S itself stays linear: the MSE trains it toward the one-hot label
                layers += ([norm_layer(norm, widths[i + 1])] if norm else []) + ([activation(act)] if act else [])
        self.path = nn.Sequential(*layers)
        self.intra_class_update = intra_class_update

    def attention_map(self, image: torch.Tensor) -> torch.Tensor:
        return self.path(image)

    def forward(self, features: torch.Tensor, attention: torch.Tensor):
        masks = F.one_hot(attention.argmax(1), attention.shape[1]).movedim(-1, 1).to(features)
        prototypes, counts = class_prototypes(features, masks)
        if self.intra_class_update:
            features = features + regenerate_from_prototypes(prototypes, masks)
        return features, prototypes, counts


@register_model("cga_unet")
class CGAUNet(SegmentationNetwork):
    """Category Guided Attention U-Net; see the module docstring for data flow, shapes and choices.

    Kwargs: ``base_features`` (b; paper 16), ``blocks`` (residual blocks per encoder level; paper
    (1, 2, 2, 4), default (1, 2, 2, 2); its length - 1 is the number of down-samplings), ``downsampling`` (r, the SAM's
    down-sampling rate, a power of 2 up to 2**L; paper 8), ``attention_features`` (width of the
    attention path; paper 16), ``attention_convs`` (its number of 3x3x3 convs; default the paper's
    max(3, log2 r)), ``attention_norm`` / ``attention_act`` (normalisation and activation between
    those convs; default none, as Table 1), ``intra_class_update`` (the paper's "Intra" switch),
    ``dropout``, ``norm``, ``act``. The inter-class switch and its start epoch are the loss's.
    """

    class_channel_maps = ("category_attention",)  # channel k is class k: shown as category_attention.<class>

    def __init__(self, in_channels: int, num_classes: int, base_features: int = 8, blocks=(1, 2, 2, 2),
                 downsampling: int = 8, attention_features: int = 16, intra_class_update: bool = True,
                 dropout: float = 0.2, norm: str = "group", act: str = "relu", attention_convs: int | None = None,
                 attention_norm: str | None = None, attention_act: str | None = None):
        super().__init__()
        blocks = tuple(int(b) for b in blocks)
        depth = len(blocks) - 1
        if depth < 1 or min(blocks) < 1:
            raise ValueError(f"blocks needs at least two levels of at least one block each, got {blocks}")
        if downsampling < 2 or downsampling & (downsampling - 1) or downsampling > 2 ** depth:
            raise ValueError(f"downsampling must be a power of 2 between 2 and 2**{depth} = {2 ** depth} "
                             f"(the network's down-sampling), got {downsampling}")
        self.divisor = 2 ** depth
        self.sam_level = int(math.log2(downsampling))
        widths = [base_features * 2 ** level for level in range(depth + 1)]

        self.init_conv = nn.Conv3d(in_channels, widths[0], 3, padding=1)
        self.dropout = nn.Dropout3d(dropout)
        self.down = nn.ModuleList(nn.Conv3d(widths[l - 1], widths[l], 3, stride=2, padding=1)
                                  for l in range(1, depth + 1))
        self.encoder = nn.ModuleList(
            nn.Sequential(*(PreActResidualBlock(w, norm, act) for _ in range(n))) for w, n in zip(widths, blocks)
        )
        self.up = nn.ModuleList(UpConcat(widths[l + 1], widths[l]) for l in reversed(range(depth)))
        self.decoder = nn.ModuleList(PreActResidualBlock(widths[l], norm, act) for l in reversed(range(depth)))
        self.end_conv = nn.Conv3d(widths[0], num_classes, 1)
        self.sam = SupervisedAttentionModule(in_channels, num_classes, downsampling, attention_features,
                                             intra_class_update, attention_convs, attention_norm, attention_act)

    def map_descriptions(self) -> dict[str, str]:
        return {"category_attention": (
            "supervised category attention map S (one channel per class, at 1/downsampling of the patch), "
            "in [0, 1]: channel k ~1 where the attention path places class k, ~0 elsewhere; it decides "
            "which voxels share a class prototype in the intra-class update")}

    def map_units(self) -> dict[str, str]:
        return {"category_attention": "attention score (1 = its class, 0 = another class)"}

    def forward(self, x: torch.Tensor) -> SegOutput:
        self.check_input(x)
        attention = self.sam.attention_map(x)
        h = self.dropout(self.init_conv(x))
        skips = []
        for level, block in enumerate(self.encoder):
            h = block(h if level == 0 else self.down[level - 1](h))
            skips.append(h)
        h = skips.pop()
        level = len(self.encoder) - 1
        if level == self.sam_level:
            h, prototypes, counts = self.sam(h, attention)
        for up, block in zip(self.up, self.decoder):
            h = block(up(h, skips.pop()))
            level -= 1
            if level == self.sam_level:
                h, prototypes, counts = self.sam(h, attention)
        maps = {"category_attention": attention.clamp(0.0, 1.0)}
        aux = ({"category_attention": attention, "class_prototypes": prototypes, "class_voxel_counts": counts}
               if self.training else {})
        return SegOutput(self.end_conv(h), maps, aux)
