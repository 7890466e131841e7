"""Dice, average symmetric surface distance and 95th-percentile Hausdorff distance per class, in mm.

Computed with MONAI (``compute_dice``, ``compute_average_surface_distance``,
``compute_hausdorff_distance``) on one-hot masks with the voxel spacing, so distances are physical.
Conventions for empty structures: both prediction and reference empty -> Dice 1, distances 0;
exactly one empty -> Dice 0, distances undefined (``None``, reported as null in JSON), or the worst
possible value when the caller gives one (``empty_distance_mm``, e.g. :func:`image_diagonal_mm`), so
that a missed structure weighs in the means instead of dropping out of them.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
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
