"""The contract every AttnSeg network follows.

``forward(x: (N, M, D, H, W)) -> SegOutput(logits, maps, aux)``

* ``logits``: (N, C, D, H, W), C classes including background, same spatial size as ``x``.
* ``maps``: name -> (N, K, d, h, w) at any resolution, values already in a readable range
  (e.g. sigmoid/softmax outputs in [0, 1]). These are what a clinician may view; the predictor
  resamples them to the patch, blends them across windows and brings them to the image grid.
* ``aux``: tensors only the training losses need (deep-supervision logits, attention predictions to
  supervise, class prototypes). Empty in ``eval()`` mode.

``segment(x: (N, M, D, H, W)) -> logits (N, C, D, H, W)``: the segmentation alone, for when no map is
asked for. Networks with map-only heads (a head whose output only feeds ``maps``) skip them here;
for the others it is ``forward(x).logits``, their maps being by-products of the segmentation pass.

``maps_from_probabilities(probabilities (N, C, D, H, W), image (N, M, D, H, W)) -> maps``: for
networks whose maps are a function of the segmentation's probabilities and the image alone
(``maps_from_probabilities_only = True``): the predictor then runs the segmentation per window and
this once per voxel on the blended result, instead of a map head on every overlapping window.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class SegOutput(NamedTuple):
    logits: torch.Tensor
    maps: dict[str, torch.Tensor]
    aux: dict[str, torch.Tensor]


class SegmentationNetwork(nn.Module):
    """Base class: subclasses set ``divisor`` and describe their maps.

    ``divisor``: every spatial size of the input must be a multiple of it (the product of the
    down-sampling strides). ``map_descriptions()``: map name -> what it means and how to read it;
    the names are exactly the keys of ``SegOutput.maps``. ``map_units()``: map name -> the unit its
    values are in, for a legend. ``class_channel_maps``: names of maps
    with one channel per class (e.g. a category attention map), so viewers can label them by class.
    """

    divisor: int = 1
    class_channel_maps: tuple[str, ...] = ()  # maps whose K channels are the C classes, in order
    # maps high where the segmentation is sure (a confidence): drawn from high to low, so the doubtful
    # low values get the bright colours and the sure ones leave the anatomy visible (training.map_display)
    maps_high_when_sure: tuple[str, ...] = ()
    maps_from_probabilities_only: bool = False  # True: maps come from maps_from_probabilities alone

    def map_descriptions(self) -> dict[str, str]:
        return {}

    def map_units(self) -> dict[str, str]:
        return {}

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """(N, M, D, H, W) -> logits (N, C, D, H, W), without the map-only heads (see the module docstring)."""
        return self.forward(x).logits

    def maps_from_probabilities(self, probabilities: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Softmax probabilities (N, C, D, H, W) of the segmentation and the image (N, M, D, H, W) ->
        the maps, as ``forward`` gives them; only networks with ``maps_from_probabilities_only``."""
        raise NotImplementedError(f"{type(self).__name__}'s maps do not come from the probabilities alone")

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise ValueError(f"expected a (N, M, D, H, W) tensor, got shape {tuple(x.shape)}")
        bad = [s for s in x.shape[2:] if s % self.divisor]
        if bad:
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} must be divisible by {self.divisor} for "
                f"{type(self).__name__}; pad or choose a patch size that is a multiple of {self.divisor}"
            )
