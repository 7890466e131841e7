"""What a run produces, described once for every front end.

A :class:`~AttnSegLib.inference.Result` becomes the same named outputs everywhere: the ``attnseg``
command writes them (``labels.nii.gz``, ``probabilities.nii.gz``, ``maps/<name>.nii.gz``, report.json),
the Slicer logic turns them into nodes and the web app lists them. Each map (:class:`OutputMap`) has one
name in all three (``probability.<class>``, ``uncertainty``, the model's own such as
``spatial_attention.level1``), one meaning, one display range, one unit and one note of what its card
measured of it (:func:`information_note`); class volumes, the doubtful-region rule and
the report are computed here and nowhere else.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .card import UNCERTAINTY, ModelCard
from .image import Image
from .map_information import BLIND_ENRICHMENT, FIGURES, FLAT_VARIATION, is_blind, is_flat

UNCERTAINTY_MEANING = ("normalised entropy of the class probabilities, in [0, 1]: 0 where the network is "
                       "certain, 1 where all classes are equally likely")
PROBABILITY_MEANING = "probability the network gives class {name!r}, in [0, 1]"
PROBABILITY_PREFIX = "probability."
# Maps whose values are probabilities or fractions: shown on the fixed range [0, 1], so a colour
# means the same value in every case. Other maps are shown on their own robust range.
UNIT_RANGE_MAPS = ("uncertainty", "difficulty", "confidence")
ROBUST_PERCENTILES = (0.5, 99.5)
# Map values in the lowest 2 % of their display range are not drawn (alpha 0 in Slicer's colour table,
# masked in the pictures), so an overlay leaves the anatomy where the map is at its floor as it is.
TRANSPARENT_BELOW = 0.02
# The uncertainty is drawn from the doubt of a voxel whose label the model gives at least 99 %: such
# voxels are wrong well under 1 % of the time (benchmarks/results/review_ceiling.md: 0.4 % below 95 %
# sure). Calibration softens the probabilities (temperature above 1): far from any boundary the default
# model's uncertainty is 0.01-0.04 (10th-90th percentile on a crop), in blocks of a few voxels, and
# drawn from 0 that noise covered the anatomy with dark squares.
NEGLIGIBLE_ERROR_PROBABILITY = 0.01
RESEARCH_MAP_AUROC = 0.75  # a map that finds the wrong voxels less well than this is labelled a research map


@dataclass(frozen=True)
class OutputMap:
    """One map of a run on the input grid. ``kind``: ``probability`` (one class's), ``uncertainty`` or
    ``model`` (the network's own); ``image``: (D, H, W) float32; ``display_range``: the values at the
    first and the last colour (high to low for a map high where the segmentation is sure); ``unit``:
    what its values are, from the card; ``detection``: how well it finds errors (:func:`detection_note`);
    ``information``: what the card measured of it (:func:`information_note`)."""

    name: str
    kind: str
    image: Image
    meaning: str
    reading: str
    display_range: tuple[float, float]
    unit: str | None = None
    detection: str = ""
    information: str = ""


def volume_token(name: str) -> str:
    """A class name as it appears in map and file names (``Left anterior`` -> ``left_anterior``)."""
    from .maps import volume_name  # imports torch; the command line's light commands start without it

    return volume_name(name)


def map_meaning(name: str, card: ModelCard | None) -> str:
    """What map ``name`` means: the uncertainty and class probabilities by definition, the model's maps
    as its card says."""
    if name == UNCERTAINTY:
        return UNCERTAINTY_MEANING
    if name.startswith(PROBABILITY_PREFIX):
        return PROBABILITY_MEANING.format(name=name[len(PROBABILITY_PREFIX):])
    return card.map_meaning(name) if card is not None else ""


def detection_note(card: ModelCard | None, map_name: str) -> str:
    """How well ``map_name`` finds the model's wrong voxels, as the card measured it (AUROC on its
    validation cases), or ``""`` where the card has no figure for it. A map under ``RESEARCH_MAP_AUROC``
    is called a research map."""
    score = card.error_detection_auroc(map_name) if card is not None else None
    if score is None:
        return ""
    note = f"Finds the model's wrong voxels with AUROC {score:.2f} on its validation cases (model card)."
    return note if score >= RESEARCH_MAP_AUROC else (f"Research map: it {note[0].lower()}{note[1:-1]}; 0.5 is "
                                                     "chance: do not rely on it to find errors.")


def information_target(card: ModelCard, volume: str) -> str:
    """What map volume ``volume`` was measured against (as :mod:`AttnSegLib.map_information` chooses
    it): its class for a channel that is a class (``category_attention.anterior`` -> ``Anterior``), else
    the whole foreground (``Anterior + Posterior``)."""
    channel = volume.rpartition(".")[2] if "." in volume else None
    for cls in card.classes:
        if channel is not None and volume_token(cls["name"]) == channel:
            return cls["name"]
    return " + ".join(card.class_names[1:])


def information_note(card: ModelCard | None, volume: str) -> str:
    """What the card measured of map volume ``volume`` on its validation cases, in words: how much of
    the map gathers inside its target (:func:`information_target`) against its average, its entropy
    relative to a flat map, the middle 90 % of its values as a ratio to its mean, and how it differs on
    the model's wrong voxels; a nearly flat map or one blind to its target is called so. ``""`` where
    the card has no figures for it (see :mod:`AttnSegLib.map_information` for each figure)."""
    measured = card.map_information(volume) if card is not None else None
    if measured is None:
        return ""
    figures = {**dict.fromkeys(FIGURES), **measured}
    target = information_target(card, volume)
    parts = []
    if figures["enrichment"] is not None:
        parts.append(f"inside {target} {figures['enrichment']:.2f}x its average (mean {figures['mean_in_target']:.3g} "
                     f"there, {figures['mean_outside']:.3g} outside)")
    if figures["entropy_ratio"] is not None:
        parts.append(f"entropy {figures['entropy_ratio']:.3f} of a flat map")
    if figures["uniform_p05"] is not None:
        parts.append(f"90 % of voxels at {figures['uniform_p05']:.2f}-{figures['uniform_p95']:.2f}x its mean")
    difference = figures["wrong_minus_right"]
    if difference is not None:
        parts.append(f"{abs(difference):.2g} {'higher' if difference >= 0 else 'lower'} on the model's wrong voxels "
                     "than on the right ones")
    note = f"Measured on its validation cases (model card): {'; '.join(parts)}."
    if figures["variation"] is not None and is_flat(figures):
        note += f" Nearly flat (it varies by less than {FLAT_VARIATION:.1%} of its mean): it shows little."
    elif figures["enrichment"] is not None and is_blind(figures):
        note += f" Blind to {target}: its mean there is within {BLIND_ENRICHMENT:.0%} of its average."
    return note


def negligible_uncertainty(class_count: int) -> float:
    """The normalised entropy of a voxel labelled with probability 1 - NEGLIGIBLE_ERROR_PROBABILITY, the
    rest shared evenly by the other ``class_count`` - 1 classes: 0.057 for three classes, 0.081 for two."""
    if class_count < 2:
        return 0.0
    doubt = NEGLIGIBLE_ERROR_PROBABILITY
    probabilities = np.array([1.0 - doubt] + [doubt / (class_count - 1)] * (class_count - 1))
    return float(-(probabilities * np.log(probabilities)).sum() / np.log(class_count))


def display_range(name: str, values: np.ndarray, card: ModelCard | None = None,
                  class_count: int = 2) -> tuple[float, float]:
    """The card's ``display_range`` for the map; for the uncertainty of ``class_count`` classes, from
    :func:`negligible_uncertainty` to 1; [0, 1] for probabilities and the other unit-range maps; else the
    0.5-99.5 percentile range of ``values``."""
    spec = card.map_spec(name) if card is not None and not name.startswith(PROBABILITY_PREFIX) else None
    if spec is not None and spec.display_range is not None:
        return spec.display_range
    if name == UNCERTAINTY:
        return round(negligible_uncertainty(class_count), 4), 1.0
    if name.startswith(PROBABILITY_PREFIX) or name.split(".")[0] in UNIT_RANGE_MAPS:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, ROBUST_PERCENTILES))
    return (low, high) if high > low else (low, low + 1e-6)


def hidden(values: np.ndarray, display_range: tuple[float, float]) -> np.ndarray:
    """Where a map is not drawn (bool, the shape of ``values``): within the first ``TRANSPARENT_BELOW`` of
    its display range from the first colour, or beyond the first colour's end."""
    first, last = display_range
    return (np.asarray(values, dtype=np.float64) - first) / (last - first) < TRANSPARENT_BELOW


def probability_map_name(class_name: str) -> str:
    """``Left anterior`` -> ``probability.left_anterior``."""
    return f"{PROBABILITY_PREFIX}{volume_token(class_name)}"


def map_meanings(result, card: ModelCard | None) -> dict[str, str]:
    """Name -> meaning of every map :func:`output_maps` gives, in its order (without computing them)."""
    meanings = {probability_map_name(c["name"]): PROBABILITY_MEANING.format(name=c["name"]) for c in result.classes[1:]}
    return {**meanings, **{name: map_meaning(name, card) for name in result.maps}}


def output_maps(result, card: ModelCard | None) -> list[OutputMap]:
    """Every map of ``result``: one probability per foreground class, then the uncertainty and the
    model's maps, in the result's order."""
    out = []
    probabilities = result.probabilities
    for cls in result.classes[1:]:
        name = probability_map_name(cls["name"])
        image = Image(probabilities.array[cls["value"]], probabilities.geometry)
        out.append(OutputMap(name, "probability", image, PROBABILITY_MEANING.format(name=cls["name"]), "",
                             (0.0, 1.0)))
    for name, image in result.maps.items():
        spec = card.map_spec(name) if card is not None and name != UNCERTAINTY else None
        out.append(OutputMap(name, "uncertainty" if name == UNCERTAINTY else "model", image, map_meaning(name, card),
                             spec.read if spec is not None else "",
                             display_range(name, image.array, card, len(result.classes)),
                             spec.unit if spec is not None else None, detection_note(card, name),
                             information_note(card, name)))
    return out


def class_volumes_ml(labels: Image, classes: list[dict]) -> dict[str, float]:
    """Foreground class name -> volume (ml, 4 decimals) of a (D, H, W) label map."""
    counts = np.bincount(np.asarray(labels.array).ravel(), minlength=len(classes))
    voxel = labels.geometry.voxel_volume_ml
    return {c["name"]: round(float(counts[c["value"]]) * voxel, 4) for c in classes[1:]}


def volumes_text(volumes: dict[str, float]) -> str:
    """``anterior 1.23 ml, posterior 0.98 ml``."""
    return ", ".join(f"{name} {ml:.2f} ml" for name, ml in volumes.items())


def map_title(name: str) -> str:
    """``spatial_attention.level1`` -> ``Spatial attention · level1``; ``probability.anterior`` ->
    ``Probability · anterior``."""
    head, _, tail = name.partition(".")
    title = head.replace("_", " ").capitalize()
    return f"{title} · {tail.replace('_', ' ')}" if tail else title


def doubtful_rule(review_map_name: str, threshold: float) -> str:
    """The rule that makes the doubtful regions, in words (the same in the panel, the page and reports)."""
    from .review import MERGE_MM, MIN_VOLUME_ML, RADIUS_MM

    return (f"{map_title(review_map_name).lower()} ≥ {threshold:.2f}; fragments within {MERGE_MM:g} mm joined and cut "
            f"into places at most {2 * RADIUS_MM:g} mm across; regions under {MIN_VOLUME_ML:g} ml left out")


def voxels_sha256(images: list[Image]) -> list[str]:
    """Each image's voxel values (as float32, so that a copy in another file format or data type matches)
    hashed: report.json's ``input_voxels_sha256``, by which ``attnseg refine`` tells the image a result was
    segmented from from another on the same grid."""
    return [hashlib.sha256(np.ascontiguousarray(image.array, dtype=np.float32).data).hexdigest() for image in images]


def report(result, package, inputs: list, timings: dict[str, float], volumetry: dict | None,
           extra: dict | None = None) -> dict:
    """The run as ``report.json`` records it."""
    card = package.card
    return {
        "inputs": [str(p) for p in inputs],
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "total_s": round(sum(timings.values()), 4),
        "provenance": result.provenance,
        "package": {"name": package.name, "sha256": package.sha256, "path": str(package.path)},
        "classes": result.classes,
        "class_volumes_ml": class_volumes_ml(result.labels, result.classes),
        "volumetry": volumetry,
        # every map by the name the Slicer and web front ends give it; probability.<class> is a channel of
        # probabilities.nii.gz, the others are maps/<name>.nii.gz
        "maps": map_meanings(result, card),
        "review_map": result.review_map_name,
        "notices": result.notices,
        **(extra or {}),
    }
