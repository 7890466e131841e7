"""Difficulty-aware attention network with confidence learning (Nie et al., AAAI 2019), in 3D.

Two sub-networks in one registered module, so one package carries both and training alternates them:

* ``segmenter`` (S, :class:`EnhancedUNet`): the paper's "enhanced U-Net". Every convolution but the
  last is a residual module; a dilated residual module sits at the smallest feature maps; each long
  skip passes a transformation module; the up-sampled and the skipped features are concatenated and
  fused through squeeze-and-excitation channel attention; deep supervision at three scales.
* ``confidence_net`` (D, :class:`ConfidenceNetwork`): a fully convolutional "discriminator", a slimmed
  U-Net on the class probabilities concatenated with the image, ``M = sigmoid(D(P_hat U X))`` (Eq. 12):
  the voxel-wise confidence that the segmentation there looks like a manual one.

``forward(x (N, M, D, H, W)) -> SegOutput``:

* ``logits`` (N, C, D, H, W) from S;
* ``maps["confidence"]`` (N, 1, D, H, W): M in [0, 1], high where D takes the segmentation for a manual
  one; ``maps["difficulty"]`` (N, 1, D, H, W): F = (1 - M)^beta in [0, 1] (Eq. 9), the voxel weight of
  the difficulty-aware cross-entropy and the map to review first;
* ``aux`` (training only): ``confidence_logits`` (N, 1, D, H, W), D's logits on S's probabilities,
  differentiable into S for the adversarial loss (Eq. 6); ``deep_supervision.1`` (N, C, D/2, H/2, W/2)
  and ``deep_supervision.2`` (N, C, D/4, H/4, W/4), logits of the two extra supervised scales.

``segment(x)`` -> logits (N, C, D, H, W) runs S alone: D only feeds the maps, so inference without
maps skips it, and ``maps_from_probabilities(P_hat, x)`` runs D alone on S's probabilities, so the
predictor runs S per window and D once per voxel on the blended probabilities.
``confidence_logits(probabilities, image)`` runs D alone, for the confidence-network step (Eq. 4).
Losses and the alternating steps: ``training/losses/difficulty_aware.py``.

Choices where the paper is open (it has no code and Fig. 1 is not in the text):

* width and depth: ``base_features`` at full resolution, doubled per level over ``depth`` levels
  (paper: not given; 8 and 4 keep the shipped network near 3 MB and trainable on a CPU);
* one residual module per encoder level, down-sampling by its first conv with stride 2 (the paper
  replaces "all the convolutional layers" by residual modules, so no pooling layer is added);
* bottleneck: one residual module with dilation ``bottleneck_dilation`` = 2 after the deepest
  down-sampling (the paper names a dilated residual module at the smallest maps, no rate);
* transformation module (Nie et al. 2018) on each long skip: one residual module at the skip's width,
  since every convolution but the last is residual;
* channel-attention fusion: squeeze-and-excitation (the paper cites Hu et al.) over the concatenation
  [up-sampled, transformed skip], then a residual module halving the width;
* deep supervision "at three scales in the decoder": the final output plus 1x1x1 heads on the decoder
  features at 1/2 and 1/4 resolution (for ``depth`` = 3 the 1/4 features are the bottleneck's); the
  loss up-samples them to the label (as in Merkow et al. 2016, whom the paper cites);
* D: "a simplified U-Net ... one convolutional layer at each stage and half the number of feature
  maps", so one conv-norm-act per stage (strided on the way down, after concatenation on the way up)
  at half S's widths, then a 1x1x1 conv to one logit channel; same depth as S;
* weights: Xavier-uniform, biases zero (the paper's initialisation).

Departures the shipped package takes (``coarse_confidence`` and ``training/error_map.py``; the card
says so): D trained by Eq. 4 learns to tell a one-hot label from soft probabilities, and its
difficulty map found the segmenter's validation errors no better than chance (AUROC 0.585). The
shipped D is instead trained, S frozen, on where S is wrong, the paper's stated purpose for M; and it
leaves out the full-resolution level (``coarse_confidence``): its U-Net runs from half resolution and
its up-sampled logit is added to a per-voxel term of the largest class probability, which keeps the
one-voxel detail of a boundary that the errors follow, at about 40 % of the paper's D's cost.
The coarse D is meant for that error objective only: under Eq. 4 its per-voxel term reads exactly what
tells a one-hot label from soft probabilities (how peaked they are), a shortcut that turns the
adversarial step into "sharpen S" (30 D steps on a real patch left L_D at 6.2 against 1.4 for the
paper's D), so alternating training keeps the paper's D.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import SegmentationNetwork, SegOutput
from .blocks import ConvNormAct, ResidualBlock, SqueezeExcitation, UpConv, segmentation_head
from .registry import register_model


SURE_EPSILON = 1e-6  # max_c p_c is kept inside [eps, 1 - eps] before its logit


def difficulty_map(confidence: torch.Tensor, beta: float) -> torch.Tensor:
    """F = (1 - M)^beta (Eq. 9): confidence M in [0, 1] -> difficulty in [0, 1], same shape."""
    return (1.0 - confidence).clamp(0.0, 1.0) ** beta


class EnhancedUNet(nn.Module):
    """S: the enhanced U-Net. (N, M, D, H, W) -> (logits (N, C, D, H, W), deep) with ``deep`` the
    deep-supervision logits at 1/2 and 1/4 resolution in training mode, [] in eval mode.
    ``widths``: channels per level, ``len(widths) >= 3``."""

    def __init__(self, in_channels: int, num_classes: int, widths: list[int], bottleneck_dilation: int = 2,
                 se_reduction: int = 4, norm: str = "instance", act: str = "leaky_relu"):
        super().__init__()
        self.encoder = nn.ModuleList(
            ResidualBlock(in_channels if level == 0 else widths[level - 1], width,
                          stride=1 if level == 0 else 2, norm=norm, act=act)
            for level, width in enumerate(widths)
        )
        self.bottleneck = ResidualBlock(widths[-1], widths[-1], dilation=bottleneck_dilation, norm=norm, act=act)
        decoder_levels = range(len(widths) - 1)
        self.transform = nn.ModuleList(ResidualBlock(widths[i], widths[i], norm=norm, act=act) for i in decoder_levels)
        self.up = nn.ModuleList(UpConv(widths[i + 1], widths[i]) for i in decoder_levels)
        self.attend = nn.ModuleList(SqueezeExcitation(2 * widths[i], se_reduction) for i in decoder_levels)
        self.fuse = nn.ModuleList(ResidualBlock(2 * widths[i], widths[i], norm=norm, act=act) for i in decoder_levels)
        self.head = segmentation_head(widths[0], num_classes)
        self.deep_heads = nn.ModuleList(segmentation_head(widths[level], num_classes) for level in (1, 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = self.bottleneck(skips.pop())
        decoded = {len(self.encoder) - 1: x}
        for level in reversed(range(len(skips))):
            merged = torch.cat([self.up[level](x), self.transform[level](skips[level])], dim=1)
            x = self.fuse[level](self.attend[level](merged))
            decoded[level] = x
        deep = [head(decoded[level]) for head, level in zip(self.deep_heads, (1, 2))] if self.training else []
        return self.head(x), deep


class ConfidenceNetwork(nn.Module):
    """D: slim fully convolutional U-Net, one conv per stage. (N, C + M, D, H, W) -> confidence
    logits (N, 1, D, H, W), the C class probabilities first. ``widths``: channels per level.

    ``coarse``: the full-resolution level is left out. The first conv is strided, the decoder stops at
    half resolution, and the half-resolution logit is up-sampled (trilinear) and added to a per-voxel
    term read from the probabilities: ``a * logit(max_c p_c) + b`` (``sureness``, a 1x1x1 conv started
    at a = 1, b = 0, so an untrained head says M = max_c p_c). The context comes from the half-resolution
    U-Net, the one-voxel detail of a boundary from the probabilities themselves.
    """

    def __init__(self, in_channels: int, widths: list[int], norm: str = "instance", act: str = "leaky_relu",
                 coarse: bool = False, num_classes: int | None = None):
        super().__init__()
        if coarse and not num_classes:
            raise ValueError("a coarse confidence network needs num_classes (its per-voxel term reads them)")
        self.coarse, self.num_classes = coarse, num_classes
        self.encoder = nn.ModuleList(
            ConvNormAct(in_channels if level == 0 else widths[level - 1], width, 3,
                        stride=2 if (level > 0 or coarse) else 1, norm=norm, act=act)
            for level, width in enumerate(widths)
        )
        decoder_levels = range(len(widths) - 1)
        self.up = nn.ModuleList(UpConv(widths[i + 1], widths[i]) for i in decoder_levels)
        self.decoder = nn.ModuleList(ConvNormAct(2 * widths[i], widths[i], 3, norm=norm, act=act)
                                     for i in decoder_levels)
        self.head = nn.Conv3d(widths[0], 1, 1)
        self.sureness = nn.Conv3d(1, 1, 1) if coarse else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = x
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for level in reversed(range(len(skips))):
            x = self.decoder[level](torch.cat([self.up[level](x), skips[level]], dim=1))
        logits = self.head(x)
        if not self.coarse:
            return logits
        logits = F.interpolate(logits, size=inputs.shape[2:], mode="trilinear", align_corners=False)
        top = inputs[:, :self.num_classes].amax(1, keepdim=True).clamp(SURE_EPSILON, 1 - SURE_EPSILON)
        return logits + self.sureness(torch.logit(top))

    def reset_sureness(self) -> None:
        """The per-voxel term back to a = 1, b = 0 (M = max_c p_c where the U-Net adds nothing)."""
        if self.sureness is not None:
            nn.init.ones_(self.sureness.weight)
            nn.init.zeros_(self.sureness.bias)


def _xavier_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@register_model("difficulty_aware")
class DifficultyAwareNetwork(SegmentationNetwork):
    """Segmenter S plus confidence network D; see the module docstring for shapes and choices.

    kwargs: ``base_features`` (S's width at full resolution; D uses half of S's widths), ``depth``
    (resolution levels, >= 3 for three supervised scales; ``divisor`` = 2**(depth-1)), ``beta`` (the
    voxel-level attention exponent of F = (1-M)^beta, paper: 2), ``bottleneck_dilation``,
    ``se_reduction`` (squeeze-and-excitation reduction ratio), ``norm``, ``act``, ``coarse_confidence``
    (the paper's D without its full-resolution level: :class:`ConfidenceNetwork`'s ``coarse``; off by
    default).
    """

    maps_from_probabilities_only = True  # D reads S's probabilities and the image, nothing else
    maps_high_when_sure = ("confidence",)

    def __init__(self, in_channels: int, num_classes: int, base_features: int = 8, depth: int = 4,
                 beta: float = 2.0, bottleneck_dilation: int = 2, se_reduction: int = 4,
                 norm: str = "instance", act: str = "leaky_relu", coarse_confidence: bool = False):
        super().__init__()
        if depth < 3:
            raise ValueError(f"depth must be at least 3 (deep supervision at three scales), got {depth}")
        if base_features < 2:
            raise ValueError(f"base_features must be at least 2 (D uses half of it), got {base_features}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0 (paper: 2), got {beta}")
        if not isinstance(coarse_confidence, bool):  # a card's "false" (a string) would build the coarse D
            raise TypeError(f"coarse_confidence must be true or false, got {coarse_confidence!r}")
        widths = [base_features * 2**level for level in range(depth)]
        self.beta = float(beta)
        self.divisor = 2 ** (depth - 1)
        self.segmenter = EnhancedUNet(in_channels, num_classes, widths, bottleneck_dilation, se_reduction, norm, act)
        confidence_widths = [w // 2 for w in widths][1 if coarse_confidence else 0:]
        self.confidence_net = ConfidenceNetwork(num_classes + in_channels, confidence_widths, norm, act,
                                                coarse=coarse_confidence, num_classes=num_classes)
        self.apply(_xavier_init)
        self.confidence_net.reset_sureness()

    def map_descriptions(self) -> dict[str, str]:
        return {
            "confidence": "Confidence network output M in [0, 1]: how much the segmentation around each "
                          "voxel looks like a manual one. Low values mark regions to check.",
            "difficulty": f"Difficulty (1 - M)^{self.beta:g} in [0, 1]: the weight the training gave each "
                          "voxel; high values are the hard, low-confidence regions to review first.",
        }

    def map_units(self) -> dict[str, str]:
        return {"confidence": "confidence (1 = looks manual)", "difficulty": "training weight (1 = hardest)"}

    def confidence_logits(self, probabilities: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """D(P U X): probabilities or one-hot labels (N, C, D, H, W) and image (N, M, D, H, W) ->
        confidence logits (N, 1, D, H, W)."""
        return self.confidence_net(torch.cat([probabilities, image], dim=1))

    def maps_from_probabilities(self, probabilities: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """D alone: S's softmax probabilities (N, C, D, H, W) and the image (N, M, D, H, W) ->
        {"confidence": M, "difficulty": F}, each (N, 1, D, H, W)."""
        return self._maps(torch.sigmoid(self.confidence_logits(probabilities, image)))

    def _maps(self, confidence: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"confidence": confidence, "difficulty": difficulty_map(confidence, self.beta)}

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """S alone: (N, M, D, H, W) -> logits (N, C, D, H, W); D, which only feeds the maps, is skipped."""
        self.check_input(x)
        return self.segmenter(x)[0]

    def forward(self, x: torch.Tensor) -> SegOutput:
        self.check_input(x)
        logits, deep = self.segmenter(x)
        confidence_logits = self.confidence_logits(torch.softmax(logits, dim=1), x)
        maps = self._maps(torch.sigmoid(confidence_logits))
        aux = {}
        if self.training:
            aux = {"confidence_logits": confidence_logits, "deep_supervision.1": deep[0],
                   "deep_supervision.2": deep[1]}
        return SegOutput(logits, maps, aux)
