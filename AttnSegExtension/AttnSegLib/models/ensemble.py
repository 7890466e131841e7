"""An ensemble of segmentation networks: their calibrated probabilities averaged, and where they disagree.

Each member m gives softmax(z_m / T_m), its logits over its own card's temperature (its calibrated
probabilities); the ensemble's probabilities are their mean p = mean_m p_m, returned as logits log p (the
predictor's softmax of them gives p back at the ensemble card's temperature 1). Its map:

* ``disagreement``: the mutual information between the class and the member, H(p) - mean_m H(p_m),
  divided by log C, in [0, 1]. It is the part of the ensemble's entropy (the ``uncertainty`` map) that
  comes from the members disagreeing: 0 wherever they give the same probabilities, however uncertain
  each one is, so it adds to the entropy what the entropy cannot say (the epistemic part; Depeweg et
  al. 2018; BALD, Houlsby et al. 2011). Chosen over the variance of the member probabilities (not in
  the entropy's units, and blind to which class a probability belongs to) and over the mean pairwise
  KL divergence (unbounded, and M(M-1) terms instead of M).

The ensemble is not built from a registry name and kwargs: :mod:`AttnSegLib.package` builds it from the
member packages its card names (``architecture: {"name": "ensemble", "kwargs": {"members": [...]}}``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import SegmentationNetwork, SegOutput

ARCHITECTURE = "ensemble"
_TINY = 1e-7


def normalised_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) probabilities -> (N, 1, ...) entropy / log C."""
    c = probabilities.shape[1]
    return -(probabilities * probabilities.clamp_min(_TINY).log()).sum(1, keepdim=True) / math.log(c)


class Ensemble(SegmentationNetwork):
    """``Ensemble(networks, temperatures)``: built networks of the same classes and input channels,
    each with the temperature its card calibrated it with."""

    architecture_name = ARCHITECTURE

    def __init__(self, networks: list[SegmentationNetwork], temperatures: list[float]):
        super().__init__()
        if len(networks) < 2 or len(networks) != len(temperatures):
            raise ValueError(f"an ensemble needs two or more networks, each with a temperature; got "
                             f"{len(networks)} networks and {len(temperatures)} temperatures")
        self.members = nn.ModuleList(networks)
        self.register_buffer("temperatures", torch.tensor([float(t) for t in temperatures]), persistent=False)
        self.divisor = math.lcm(*(int(n.divisor) for n in networks))

    def map_descriptions(self) -> dict[str, str]:
        return {"disagreement": "Mutual information between the class and the member network, H(mean p) - "
                                "mean H(p_m), / log C, in [0, 1]: how much the member networks disagree at "
                                "each voxel (0 = they agree, however unsure each is)."}

    def map_units(self) -> dict[str, str]:
        return {"disagreement": "fraction of log C (1 = total disagreement)"}

    def member_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(N, M, D, H, W) -> (K, N, C, D, H, W): each member's calibrated probabilities (its segmentation
        step alone: no member map is computed)."""
        self.check_input(x)
        return torch.stack([torch.softmax(net.segment(x).float() / t, dim=1)
                            for net, t in zip(self.members, self.temperatures.tolist())])

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """(N, M, D, H, W) -> log of the mean calibrated probabilities (N, C, D, H, W)."""
        return self.member_probabilities(x).mean(0).clamp_min(_TINY).log()

    def forward(self, x: torch.Tensor) -> SegOutput:
        members = self.member_probabilities(x)
        mean = members.mean(0)
        member_entropy = torch.stack([normalised_entropy(p) for p in members]).mean(0)
        disagreement = (normalised_entropy(mean) - member_entropy).clamp(0.0, 1.0)
        return SegOutput(mean.clamp_min(_TINY).log(), {"disagreement": disagreement}, {})
