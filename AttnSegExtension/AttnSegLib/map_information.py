"""How much a model's map says about a case, measured against the case's reference labels.

For one map volume m >= 0, (D, H, W) on the input grid (a channel of a multi-channel map is one volume),
with the reference labels and the prediction on the same grid:

* ``entropy_ratio``: H(m / sum m) / log N over the N voxels, the map read as a distribution of its mass:
  1 for a flat map, lower the more it gathers its mass (a map on 3 % of a hippocampus crop: ~0.69).
* ``uniform_p05``, ``uniform_p95``: the 5th and 95th percentiles of m / mean(m), the map as a ratio to
  its own uniform level (1 / 1 for a flat map; slice or position attention within +-15 % of uniform:
  ~0.85 / ~1.15).
* ``variation``: the standard deviation of m / mean(m) (coefficient of variation): 0 for a flat map,
  ~0.1 for one within +-15 % of uniform, ~4 for a map on 5 % of the volume.
* ``target_share``: the target's share of the voxels; ``target_mass``: the share of the map's mass
  inside it; ``enrichment`` = target_mass / target_share (1: the map is blind to the target, > 1: it
  gathers there, < 1: it avoids it). The target is the reference voxels of the map's class for a
  channel that is a class (``category_attention.anterior``), else the whole reference foreground.
* ``mean_in_target``, ``mean_outside``: the map's mean inside and outside the target (CGA U-Net's
  category attention should read ~1 inside its own class).
* ``wrong_minus_right``: the map's mean on the wrongly labelled voxels minus its mean on the right
  ones (None when the case has no wrong voxel): how it differs where the segmentation fails.
* ``value_p01``, ``value_p99``: the 1st and 99th percentiles of the values (a display range that shows
  the map's structure).

``is_flat`` and ``is_blind`` are the tests a shipped map must pass (see their thresholds).
"""
from __future__ import annotations

import numpy as np

FIGURES = ("entropy_ratio", "uniform_p05", "uniform_p95", "variation", "target_share", "target_mass",
           "enrichment", "mean_in_target", "mean_outside", "wrong_minus_right", "value_p01", "value_p99")
# A map is flat when its values vary by less than 2.5 % of their mean (variation < 0.025) ...
FLAT_VARIATION = 0.025
# ... and blind to the target when its mean there is within 5 % of its mean over the volume.
BLIND_ENRICHMENT = 0.05


def map_information(values: np.ndarray, reference: np.ndarray, prediction: np.ndarray,
                    target_value: int | None = None) -> dict[str, float | None]:
    """The figures of the module docstring for one map volume ``values`` (D, H, W) >= 0, with the
    reference and predicted labels (D, H, W) on its grid; ``target_value``: the class this map is a
    channel of (None: the target is the whole foreground)."""
    m = np.asarray(values, dtype=np.float64).ravel()
    if m.size == 0 or not np.all(np.isfinite(m)) or m.min() < 0:
        raise ValueError("a map must be a non-empty volume of finite values >= 0")
    reference, prediction = reference.ravel(), prediction.ravel()
    target = reference > 0 if target_value is None else reference == target_value
    total, mean = m.sum(), m.mean()
    figures: dict[str, float | None] = dict.fromkeys(FIGURES)
    figures["value_p01"], figures["value_p99"] = (float(v) for v in np.percentile(m, [1, 99]))
    if total > 0:
        p = m[m > 0] / total
        figures["entropy_ratio"] = float(-(p * np.log(p)).sum() / np.log(m.size))
        low, high = np.percentile(m / mean, [5, 95])
        figures.update(uniform_p05=float(low), uniform_p95=float(high), variation=float(m.std() / mean))
    else:
        figures.update(entropy_ratio=1.0, uniform_p05=1.0, uniform_p95=1.0, variation=0.0)
    share = float(target.mean())
    figures["target_share"] = share
    if 0 < share < 1:
        figures["mean_in_target"] = float(m[target].mean())
        figures["mean_outside"] = float(m[~target].mean())
        if total > 0:
            figures["target_mass"] = float(m[target].sum() / total)
            figures["enrichment"] = figures["target_mass"] / share
    wrong = reference != prediction
    if wrong.any() and not wrong.all():
        figures["wrong_minus_right"] = float(m[wrong].mean() - m[~wrong].mean())
    return figures


def is_flat(figures: dict) -> bool:
    """True when the map hardly departs from its uniform level (``variation`` < FLAT_VARIATION)."""
    return figures["variation"] < FLAT_VARIATION


def is_blind(figures: dict) -> bool:
    """True when the map reads the same inside the target as over the volume (``enrichment`` within
    BLIND_ENRICHMENT of 1), or the target is absent or everywhere."""
    return figures["enrichment"] is None or abs(figures["enrichment"] - 1.0) < BLIND_ENRICHMENT


def mean_figures(per_case: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Figure -> its mean over the cases where it is defined (None where it never is)."""
    means = {}
    for name in FIGURES:
        values = [f[name] for f in per_case if f.get(name) is not None]
        means[name] = round(float(np.mean(values)), 5) if values else None
    return means
