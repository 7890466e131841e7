"""Intensities of each input modality: robust normalisation statistics, what the training cases looked
like, and notices when an input looks unlike them.

Normalisation clips a modality before its z-score, as nnU-Net does for CT with its 0.5-99.5th
percentiles; here the clip is that percentile range widened by its own width on each side (Tukey's
fence on the central 99 %), so that anatomy, bright enhancing tumour included, is left as the shipped
models were trained on it (clipping at the percentiles themselves took the BraTS model's
enhancing-tumour Dice on its held-out case from 0.56 to 0.36), while one hot voxel at 1e20, which made
a plain z-score divide every voxel by an infinite standard deviation, changes nothing. Measuring that, it also records a :class:`Profile`:

* ``quantiles``: its values at :data:`LEVELS` after normalisation (z units), the shape of the histogram
  whatever the scanner's intensity scale: a label map or another contrast given as the image differs
  here, two T1 scanners hardly (the FLAIR and T1c of the BraTS sample do not differ enough to tell a
  swap from these alone);
* ``outlier_extent``: how far its most extreme voxel lies beyond the 0.5-99.5th percentiles, in units
  of their range (above 1 it was clipped), and ``extreme``, that voxel's value;
* ``roughness`` (:func:`roughness`): how much neighbouring voxels differ, in units of the tissue's
  spread, a property of the contrast that no scaling of the intensities changes. Within one case it
  orders the modalities the same way in every training case, whatever the scanner: the BraTS sample's
  T1c is 1.15-1.62 times as rough as its FLAIR, so the two swapped show although their histograms
  (z-scored inside the brain by the data's providers) are alike.

At export, :func:`summarise` records per modality the range of the training cases' profiles (the card's
``input_statistics``), and for a model of several modalities each one's roughness relative to the
case's others; :func:`input_notices` compares an input's profiles against it: a distribution outside
the training range, extreme outliers, and inputs whose order looks swapped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

CLIP_PERCENTILES = (0.5, 99.5)
FENCE = 1.0  # the clip lies this many percentile ranges beyond the percentiles
LEVELS = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
_SAMPLE_VOXELS = 1 << 22  # percentiles of larger volumes are taken on an evenly strided subsample
_OUTLIER_NOTICE_EXTENT = 3.0  # a voxel this many percentile ranges out is no anatomy; twice the training's
_QUANTILE_MARGIN = 0.25  # z units allowed beyond the training range at least ...
_SMALL_SAMPLE_WIDENING = 3.0  # ... and the range's own width times 1 + this / sqrt(training cases): few
                              # cases span less of what the population does
_SWAP_RATIO = 2.0  # the swapped order must fit this many times better than the given one
MASKED_BACKGROUND_FRACTION = 0.01  # more voxels than this at the minimum (or at zero): a masked scan's background


@dataclass(frozen=True)
class Profile:
    """Intensity profile of one modality (see the module docstring); ``clip``: the (low, high) values
    it was clipped to."""

    quantiles: tuple[float, ...]
    outlier_extent: float
    extreme: float
    clip: tuple[float, float]
    roughness: float | None = None


def sample(values: np.ndarray) -> np.ndarray:
    """``values`` flattened, or an evenly strided subsample of at most ~4 M voxels (a view, no copy)."""
    flat = values.reshape(-1)
    return flat[:: max(1, math.ceil(flat.size / _SAMPLE_VOXELS))]


def clip_and_standardise(values: np.ndarray) -> Profile:
    """Clip float32 ``values`` (any shape) to their 0.5-99.5th percentiles widened by :data:`FENCE`
    times their range, and z-score them, in place; -> their :class:`Profile`. Constant values become
    zeros."""
    levels = np.percentile(sample(values), [*CLIP_PERCENTILES, *(100 * q for q in LEVELS)])
    spread = float(levels[1] - levels[0])
    low, high = float(levels[0]) - FENCE * spread, float(levels[1]) + FENCE * spread
    smallest, largest = float(values.min()), float(values.max())
    beyond = max(largest - float(levels[1]), float(levels[0]) - smallest)
    extent = beyond / spread if spread > 0 else 0.0
    extreme = largest if largest - float(levels[1]) >= float(levels[0]) - smallest else smallest
    np.clip(values, low, high, out=values)
    mean = float(values.mean(dtype=np.float64))
    values -= mean
    flat = values.reshape(-1)
    with np.errstate(over="ignore"):  # measured again below: no RuntimeWarning on the user's console
        std = math.sqrt(float(flat.dot(flat)) / flat.size)
    if not math.isfinite(std):  # float32 squares overflow beyond ~1e19: measure on a float64 sample
        std = float(np.std(sample(values), dtype=np.float64))
    if std > 0:
        values /= std
        quantiles = tuple(round((float(q) - mean) / std, 4) for q in levels[2:])
    else:
        values[...] = 0.0
        quantiles = (0.0,) * len(LEVELS)
    return Profile(quantiles, round(extent, 4), extreme, (low, high))


def tissue_mask(channel: np.ndarray) -> np.ndarray:
    """(D, H, W) bool: every voxel of a raw ``channel`` but a masked or padded scan's background: the
    minimum value, and zero, each where more than 1 % of the voxels hold it (a skull-stripped brain's
    zeros, the BraTS sample's z-score of raw zero, zero padding of an image whose values go below zero)."""
    tissue = np.ones(channel.shape, dtype=bool)
    for value in {float(channel.min()), 0.0}:
        background = channel == value
        if background.mean() > MASKED_BACKGROUND_FRACTION:
            tissue &= ~background
    return tissue


def roughness(channel: np.ndarray, tissue: np.ndarray) -> float | None:
    """The mean absolute difference between face-neighbouring voxels of a (D, H, W) ``channel``, over
    pairs of ``tissue`` voxels (:func:`tissue_mask`), in units of the tissue's standard deviation (None
    without two such voxels or with constant tissue)."""
    values = channel[tissue]
    spread = float(values.std(dtype=np.float64)) if values.size > 1 else 0.0
    total, pairs = 0.0, 0
    for axis in range(3):
        ahead = [slice(None)] * 3
        behind = [slice(None)] * 3
        ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
        both = tissue[tuple(ahead)] & tissue[tuple(behind)]
        total += float(np.abs(channel[tuple(ahead)] - channel[tuple(behind)])[both].sum(dtype=np.float64))
        pairs += int(both.sum())
    if spread == 0 or pairs == 0:
        return None
    return round(total / pairs / spread, 4)


def summarise(profiles: list[list[Profile | None]], names: list[str]) -> dict:
    """The card's ``input_statistics`` from the training cases' profiles (case -> one per modality)."""
    relative = _relative_roughness_by_case(profiles) if len(names) > 1 else None
    modalities = []
    for index, name in enumerate(names):
        measured = [case[index] for case in profiles if case[index] is not None]
        if not measured:
            continue
        quantiles = np.array([p.quantiles for p in measured])
        modality = {
            "name": name, "cases": len(measured),
            "quantiles_min": [round(float(v), 4) for v in quantiles.min(0)],
            "quantiles_median": [round(float(v), 4) for v in np.median(quantiles, 0)],
            "quantiles_max": [round(float(v), 4) for v in quantiles.max(0)],
            "outlier_extent_max": round(max(p.outlier_extent for p in measured), 4),
        }
        if relative is not None and len(relative):
            modality["relative_roughness"] = [round(float(f(relative[:, index])), 4) for f in (np.min, np.median, np.max)]
        modalities.append(modality)
    description = ("per modality, over the training cases in the model frame: the normalised values (z units, "
                   "after clipping to the 0.5-99.5th percentiles) at the quantile levels, and how far the most "
                   "extreme voxel lay beyond the clipping range (in clipping ranges)")
    if any("relative_roughness" in m for m in modalities):
        description += ("; relative_roughness: the natural log of its roughness (mean absolute difference of "
                        "neighbouring tissue voxels over their standard deviation) less the mean over the case's "
                        "modalities (min, median, max)")
    return {"description": description, "levels": list(LEVELS), "modalities": modalities}


def _relative_roughness(profiles: list[Profile | None]) -> np.ndarray | None:
    """Each modality's log roughness less the mean over the case's modalities (None when one is unknown)."""
    if any(p is None or p.roughness is None or p.roughness <= 0 for p in profiles):
        return None
    logs = np.log([p.roughness for p in profiles])
    return logs - logs.mean()


def _relative_roughness_by_case(profiles: list[list[Profile | None]]) -> np.ndarray:
    """(cases, modalities) relative roughness of the cases where every modality has one."""
    rows = [r for r in (_relative_roughness(case) for case in profiles) if r is not None]
    return np.array(rows).reshape(len(rows), len(profiles[0]) if profiles else 0)


def input_notices(profiles: list[Profile | None], names: list[str], statistics: dict | None) -> list[str]:
    """Notices for an input whose modalities' profiles (in the card's order) look unlike the training
    cases': an extreme outlier, a distribution outside the training range, a swapped order."""
    trained = {m["name"]: m for m in (statistics or {}).get("modalities", [])}
    notices = []
    for name, profile in zip(names, profiles):
        if profile is None:
            continue
        stats = trained.get(name)
        limit = max(_OUTLIER_NOTICE_EXTENT, 2 * stats["outlier_extent_max"]) if stats else _OUTLIER_NOTICE_EXTENT
        if profile.outlier_extent > limit:
            notices.append(f"{name}: voxels as extreme as {profile.extreme:.4g} lie far outside the image's range; "
                           f"they were clipped to {profile.clip[0]:.4g}..{profile.clip[1]:.4g} — check the image "
                           "for hot pixels or a wrong data type")
        if stats and _outside(profile.quantiles, stats):
            shown = ", ".join(f"{v:.2f}" for v in profile.quantiles)
            notices.append(f"{name}: its intensity distribution is unlike the training cases' (normalised "
                           f"quantiles {shown}; training {_range_text(stats)}); the result may be unreliable — "
                           f"check that this is a {name} image")
    stats = [trained.get(n) for n in names]
    swapped = _better_order(profiles, stats) or _better_roughness_order(profiles, stats)
    if swapped:
        looks = ", ".join(f"input {i + 1} (given as {names[i]}) looks like {names[j]}" for i, j in swapped)
        notices.append(f"the modalities look swapped: {looks}; give them in the model's order "
                       f"({', '.join(names)})")
    return notices


def _outside(quantiles, stats: dict) -> bool:
    low, high = np.asarray(stats["quantiles_min"]), np.asarray(stats["quantiles_max"])
    margin = np.maximum(_QUANTILE_MARGIN, (high - low) * (1 + _SMALL_SAMPLE_WIDENING / math.sqrt(stats["cases"])))
    low, high = low - margin, high + margin
    values = np.asarray(quantiles)
    return bool(np.any((values < low) | (values > high)))


def _range_text(stats: dict) -> str:
    return ", ".join(f"{a:.2f}..{b:.2f}" for a, b in zip(stats["quantiles_min"], stats["quantiles_max"]))


def _better_order(profiles: list[Profile | None], stats: list[dict | None]) -> list[tuple[int, int]]:
    """(input, card modality) pairs of the order that fits the training profiles far better than the
    given one, or [] (also when a profile or a modality's statistics is missing)."""
    if len(profiles) < 2 or any(p is None for p in profiles) or any(s is None for s in stats):
        return []
    cost = np.array([[float(np.abs(np.subtract(p.quantiles, s["quantiles_median"])).mean()) for s in stats]
                     for p in profiles])  # cost[input, modality]
    return _swaps(cost)


def _better_roughness_order(profiles: list[Profile | None], stats: list[dict | None]) -> list[tuple[int, int]]:
    """As :func:`_better_order`, from each input's roughness relative to the others' against the
    training cases'; only when the training ranges of the modalities do not overlap (the roughness
    tells them apart in every training case)."""
    if len(profiles) < 2 or any(s is None or "relative_roughness" not in s for s in stats):
        return []
    relative = _relative_roughness(profiles)
    if relative is None:
        return []
    ranges = sorted(tuple(s["relative_roughness"]) for s in stats)
    if any(high >= next_low for (_, _, high), (next_low, _, _) in zip(ranges, ranges[1:])):
        return []
    cost = np.abs(relative[:, None] - np.array([s["relative_roughness"][1] for s in stats])[None, :])
    return _swaps(cost)


def _swaps(cost: np.ndarray) -> list[tuple[int, int]]:
    """(input, modality) pairs of the assignment of least ``cost[input, modality]`` when it fits
    :data:`_SWAP_RATIO` times better than the given order (input i as modality i), else []."""
    given = float(np.trace(cost))
    inputs, best = linear_sum_assignment(cost)
    best_cost = float(cost[inputs, best].sum())
    if np.array_equal(best, inputs) or given < _SWAP_RATIO * best_cost:
        return []
    return [(int(i), int(j)) for i, j in zip(inputs, best) if i != j]
