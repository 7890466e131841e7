"""Dice, average symmetric surface distance and 95th-percentile Hausdorff distance per class, in mm.

Computed with MONAI (``compute_dice``, ``compute_average_surface_distance``,
``compute_hausdorff_distance``) on one-hot masks with the voxel spacing, so distances are physical.
Conventions for empty structures: both prediction and reference empty -> Dice 1, distances 0;
exactly one empty -> Dice 0, distances undefined (``None``, reported as null in JSON), or the worst
possible value when the caller gives one (``empty_distance_mm``, e.g. :func:`image_diagonal_mm`), so
that a missed structure weighs in the means instead of dropping out of them.

What a reviewer needs of the doubt maps and probabilities, on one case's (D, H, W) arrays:

* :func:`error_detection_auroc` and :func:`error_detection_average_precision` (AUPRC): how well a
  doubt map ranks the wrongly labelled voxels above the right ones. Precision matters here: errors
  are ~1 % of a crop, so a map can rank them well (AUROC) while flagging mostly right voxels;
* :func:`boundary_distance_doubt`: the trivial baseline every map is compared with, doubt that is
  only the nearness to the predicted boundary (most errors of a good segmenter lie on it);
* :func:`review_effort_curve`: the fraction of the wrong voxels found when the user reviews the most
  doubtful voxels covering a given fraction of the volume (the doubtful regions above a threshold);
* :func:`calibration_bins` and :func:`expected_calibration_error`: calibration of the foreground
  class probabilities, binned so cases add up and a reliability diagram can be drawn.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import ndimage
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance, compute_roc_auc

from .image import Geometry, Image


def _as_array(x: Image | np.ndarray) -> np.ndarray:
    return x.array if isinstance(x, Image) else np.asarray(x)


def evaluate_labels(prediction: Image | np.ndarray, reference: Image | np.ndarray,
                    spacing=None, labels: dict[int, str] | list[int] | None = None,
                    empty_distance_mm: float | None = None) -> dict[str, dict]:
    """Per-class metrics of two (D, H, W) label maps on the same grid.

    ``spacing``: (x, y, z) mm, taken from ``reference`` when it is an :class:`Image`.
    ``labels``: class values to score (background excluded by default), or value -> name.
    ``empty_distance_mm``: ASD and HD95 where exactly one of the two is empty (default None: undefined).
    Returns ``{class name: {"dice", "asd_mm", "hd95_mm", "reference_ml", "prediction_ml"}}``.
    """
    pred, ref = _as_array(prediction), _as_array(reference)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} are not on the same grid; "
                         "resample the prediction onto the reference first")
    if spacing is None:
        spacing = reference.geometry.spacing if isinstance(reference, Image) else (1.0, 1.0, 1.0)
    spacing_dhw = tuple(float(s) for s in reversed(tuple(spacing)))
    if labels is None:
        values = sorted(int(v) for v in np.union1d(np.unique(pred), np.unique(ref)) if v != 0)
        labels = {v: str(v) for v in values}
    elif not isinstance(labels, dict):
        labels = {int(v): str(v) for v in labels}
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out = {}
    for value, name in labels.items():
        p = torch.from_numpy(pred == value)[None, None]
        r = torch.from_numpy(ref == value)[None, None]
        p_any, r_any = bool(p.any()), bool(r.any())
        entry = {"reference_ml": round(float(r.sum()) * voxel_ml, 4),
                 "prediction_ml": round(float(p.sum()) * voxel_ml, 4)}
        if not p_any and not r_any:
            entry.update(dice=1.0, asd_mm=0.0, hd95_mm=0.0)
        elif p_any != r_any:
            entry.update(dice=0.0, asd_mm=empty_distance_mm, hd95_mm=empty_distance_mm)
        else:
            with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal argument
                warnings.simplefilter("ignore", FutureWarning)
                entry.update(_overlap_and_distances(p, r, spacing_dhw))
        out[name] = entry
    return out


def _overlap_and_distances(p: torch.Tensor, r: torch.Tensor, spacing_dhw) -> dict:
    """Dice, symmetric ASD and HD95 of two non-empty (1, 1, D, H, W) boolean masks."""
    return {
        "dice": float(compute_dice(p.float(), r.float(), include_background=True)),
        "asd_mm": float(compute_average_surface_distance(p, r, include_background=True, symmetric=True,
                                                         spacing=spacing_dhw)),
        "hd95_mm": float(compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                                    spacing=spacing_dhw)),
    }


def image_diagonal_mm(geometry: Geometry) -> float:
    """Length (mm) of the diagonal of the box the grid's voxels fill: no surface distance inside the
    image can be longer."""
    return round(float(np.linalg.norm(np.asarray(geometry.size) * np.asarray(geometry.spacing))), 4)


def mean_over_classes(per_class: dict[str, dict], key: str) -> float | None:
    values = [m[key] for m in per_class.values() if m.get(key) is not None]
    return float(np.mean(values)) if values else None


def error_detection_auroc(doubt: Image | np.ndarray, errors: np.ndarray) -> float | None:
    """How well a doubt map (D, H, W), high = doubtful, ranks the wrongly labelled voxels (D, H, W bool)
    above the right ones: the area under the ROC curve (0.5 = no better than chance, 1 = every error
    ranked first), MONAI's ``compute_roc_auc``. None when the segmentation has no error or no right voxel."""
    wrong = np.asarray(errors, dtype=bool).ravel()
    if wrong.all() or not wrong.any():
        return None
    scores = torch.from_numpy(np.ascontiguousarray(_as_array(doubt), dtype=np.float32).ravel())
    return float(compute_roc_auc(scores, torch.from_numpy(wrong.astype(np.float32))))


def _ranked_errors(doubt: Image | np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(doubt values sorted high to low, the wrong-voxel flags in that order), both (V,)."""
    scores = np.asarray(_as_array(doubt), dtype=np.float32).ravel()
    wrong = np.asarray(errors, dtype=bool).ravel()
    order = np.argsort(-scores, kind="stable")
    return scores[order], wrong[order]


def error_detection_average_precision(doubt: Image | np.ndarray, errors: np.ndarray) -> float | None:
    """Average precision (area under the precision-recall curve) of a doubt map (D, H, W), high =
    doubtful, for the wrong voxels (D, H, W bool): sum over the distinct doubt values t, high to low,
    of (recall gained at t) x (precision of the voxels >= t). Chance level is the fraction of wrong
    voxels; 1 = every wrong voxel above every right one. None when there is no error or no right voxel."""
    scores, wrong = _ranked_errors(doubt, errors)
    if wrong.all() or not wrong.any():
        return None
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]  # one threshold per distinct value
    found = np.cumsum(wrong)[last_of_tie]
    flagged = np.flatnonzero(last_of_tie) + 1
    recall_gain = np.diff(np.r_[0, found]) / found[-1]
    return float(np.sum(recall_gain * found / flagged))


def boundary_distance_mm(labels: Image | np.ndarray, spacing=(1.0, 1.0, 1.0)) -> np.ndarray | None:
    """(D, H, W) labels -> (D, H, W) float64 distance in mm (``spacing`` x, y, z) from each voxel's
    centre to the nearest boundary voxel (one whose label differs from one of its 6 face neighbours;
    0 on the boundary, which holds the voxels on both sides). None when the labels hold one class."""
    lab = _as_array(labels)
    boundary = np.zeros(lab.shape, dtype=bool)
    for axis in range(lab.ndim):
        differs = np.diff(lab, axis=axis) != 0
        lower = [slice(None)] * lab.ndim
        upper = [slice(None)] * lab.ndim
        lower[axis], upper[axis] = slice(None, -1), slice(1, None)
        boundary[tuple(lower)] |= differs
        boundary[tuple(upper)] |= differs
    if not boundary.any():
        return None
    return ndimage.distance_transform_edt(~boundary, sampling=tuple(reversed(tuple(spacing))))


def boundary_distance_doubt(labels: Image | np.ndarray, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """The boundary baseline: (D, H, W) labels -> (D, H, W) float32 doubt 1 / (1 + d), d the
    :func:`boundary_distance_mm` to the predicted boundary; 1 on the boundary. Constant 0 when the
    labels hold one class."""
    distance = boundary_distance_mm(labels, spacing)
    if distance is None:
        return np.zeros(_as_array(labels).shape, dtype=np.float32)
    return (1.0 / (1.0 + distance)).astype(np.float32)


def review_effort_curve(doubt: Image | np.ndarray, errors: np.ndarray,
                        volume_fractions: np.ndarray) -> np.ndarray | None:
    """Fraction of the wrong voxels (D, H, W bool) inside the most doubtful voxels of ``doubt``
    (D, H, W) that cover each of ``volume_fractions`` (K,) of the volume: (K,) values in [0, 1]. The
    voxels above a doubt threshold are the doubtful regions :func:`review.doubtful_regions` finds at
    that threshold, so this is the share of the errors a user finds by reviewing regions of that
    total volume. Ties are broken in voxel order. None when there is no error."""
    _, wrong = _ranked_errors(doubt, errors)
    if not wrong.any():
        return None
    found = np.r_[0, np.cumsum(wrong)] / wrong.sum()
    reviewed = np.clip(np.round(np.asarray(volume_fractions, dtype=float) * wrong.size), 0, wrong.size)
    return found[reviewed.astype(int)]


def volume_to_find(curve: np.ndarray, volume_fractions: np.ndarray, share: float) -> float | None:
    """The smallest of ``volume_fractions`` (K,) at which ``curve`` (K,) finds ``share`` of the errors
    (None when none does)."""
    reached = np.flatnonzero(np.asarray(curve) >= share)
    return float(volume_fractions[reached[0]]) if reached.size else None


def calibration_bins(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> np.ndarray:
    """Binned calibration of the foreground class probabilities: (C, D, H, W) probabilities and
    (D, H, W) labels -> (3, n_bins) float64 rows [voxel count, sum of probabilities, sum of outcomes].
    Every voxel gives one pair per foreground class c >= 1, (p_c, label == c) (class-wise calibration,
    background left out because its ~99 % of easy voxels would hide any miscalibration), put in one of
    ``n_bins`` equal-width bins of p_c. Sum the arrays of several cases to pool them."""
    bins = np.zeros((3, n_bins))
    for c in range(1, probabilities.shape[0]):
        p = np.asarray(probabilities[c], dtype=np.float64).ravel()
        index = np.minimum((p * n_bins).astype(int), n_bins - 1)
        bins[0] += np.bincount(index, minlength=n_bins)
        bins[1] += np.bincount(index, weights=p, minlength=n_bins)
        bins[2] += np.bincount(index, weights=(np.asarray(labels).ravel() == c), minlength=n_bins)
    return bins


def expected_calibration_error(bins: np.ndarray) -> float:
    """ECE of :func:`calibration_bins`' (3, B) array: sum over bins of (pairs in the bin / all pairs)
    x |mean probability - observed frequency|, in [0, 1] (0 = calibrated)."""
    count, confidence, outcome = bins
    filled = count > 0
    gap = np.abs(confidence[filled] - outcome[filled]) / count[filled]
    return float(np.sum(count[filled] / count.sum() * gap))
