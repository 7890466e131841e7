"""Per-voxel maps a clinician can read: probabilities, uncertainty, and each model's own maps.

* uncertainty: normalised Shannon entropy of the class probabilities, H(p) / log(C), in [0, 1]
  (0 = the network is certain, 1 = all classes equally likely).
* tta_variance (with flip test-time augmentation): how much the mirrored passes disagree, the
  variance of the probabilities over the flips summed over the classes, / (1 - 1/C), in [0, 1].
* disagreement (an ensemble package): how much its member networks disagree, the mutual information
  (H(mean p) - mean H(p_m)) / log C, in [0, 1] (:mod:`AttnSegLib.models.ensemble`).
* model maps (``SegOutput.maps``): produced per window at any resolution, resized to the window
  (trilinear), blended across windows with the same Gaussian weights as the probabilities, and
  brought to the input grid like them. A K-channel map becomes K volumes named ``name.<class>``
  when its channels are classes (the network lists it in ``class_channel_maps``), else ``name.<k>``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_EPS = 1e-7
# Maps whose high values mean "doubtful": the candidates for ranking the regions a clinician reviews.
DOUBT_MAPS = ("uncertainty", "difficulty", "tta_variance", "disagreement")


def normalized_entropy(probabilities: np.ndarray) -> np.ndarray:
    """(C, D, H, W) probabilities summing to 1 over C -> (D, H, W) entropy / log(C) in [0, 1]."""
    c = probabilities.shape[0]
    entropy = np.zeros(probabilities.shape[1:], dtype=np.float32)
    term = np.empty_like(entropy)  # class by class: one volume of scratch, not C
    for p in probabilities:
        np.clip(p, _EPS, 1.0, out=term)
        np.log(term, out=term)
        term *= p
        entropy -= term
    entropy /= np.log(c)
    return np.clip(entropy, 0.0, 1.0, out=entropy)


def resize_map(value: torch.Tensor, size) -> torch.Tensor:
    """(N, K, d, h, w) -> (N, K, *size), trilinear; unchanged when already that size."""
    if tuple(value.shape[2:]) == tuple(size):
        return value
    return F.interpolate(value.float(), size=tuple(size), mode="trilinear", align_corners=False)


def split_channels(name: str, value: np.ndarray, class_names: list[str] | None) -> dict[str, np.ndarray]:
    """(K, D, H, W) -> {volume name: (D, H, W)}; see the module docstring for naming."""
    if value.shape[0] == 1:
        return {name: value[0]}
    if class_names is not None and len(class_names) == value.shape[0]:
        return {f"{name}.{cls}": value[k] for k, cls in enumerate(class_names)}
    return {f"{name}.{k}": value[k] for k in range(value.shape[0])}


def volume_name(class_name: str) -> str:
    """A class name as a file-name-safe token (``Anterior hippocampus`` -> ``anterior_hippocampus``)."""
    return "".join(ch if ch.isalnum() else "_" for ch in class_name.strip().lower()).strip("_")
