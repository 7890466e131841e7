"""Every shipped attention map says something: not flat, not blind to the hippocampus, and a map whose
channels are classes reads high inside its own class. Measured through the product path (``Predictor``
with maps, as ``training.evaluate --maps``) with the shipped weights on real held-out cases."""
from __future__ import annotations

import math

import numpy as np
import pytest

from AttnSegLib.inference import Predictor
from AttnSegLib.map_information import is_blind, is_flat, map_information
from AttnSegLib.package import load_package
from training.data import find_cases
from training.evaluate import (BOUNDARY_BASELINE, EFFORT_FRACTIONS, Evaluation, dataset_description, evaluate_cases,
                               summarize_map_information)
from training.map_display import apply_review, display_ranges

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CASES = ("hippocampus_001", "hippocampus_008", "hippocampus_011")  # held out from every hippocampus package
# (package, map, test) -> why that test fails today; the mark is strict, so a map that starts passing
# (a retrained package) must be taken off this list
KNOWN_WEAK: dict[tuple[str, str, str], str] = {}
SHIPPED_MAPS = [("hippocampus_cga_unet", "category_attention"),
                ("hippocampus_rsanet", "slice_attention.sagittal"), ("hippocampus_rsanet", "slice_attention.coronal"),
                ("hippocampus_rsanet", "slice_attention.axial"),
                ("hippocampus_mda_unet", "position_attention"), ("hippocampus_mda_unet", "coarse_segmentation"),
                ("hippocampus_dam_al", "spatial_attention.level1"), ("hippocampus_dam_al", "spatial_attention.level2"),
                ("hippocampus_difficulty_aware", "confidence"), ("hippocampus_difficulty_aware", "difficulty")]


def _weak(package: str, name: str, *, test: str):
    reason = KNOWN_WEAK.get((package, name, test))
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(package, name, marks=marks, id=f"{package}-{name}")


def test_a_flat_map_is_flat_and_blind():
    reference = np.zeros((8, 8, 8), np.uint8)
    reference[2:4, 2:4, 2:4] = 1
    figures = map_information(np.full((8, 8, 8), 0.3), reference, reference)
    assert figures["entropy_ratio"] == pytest.approx(1.0) and figures["variation"] == pytest.approx(0.0)
    assert figures["enrichment"] == pytest.approx(1.0) and figures["wrong_minus_right"] is None
    assert is_flat(figures) and is_blind(figures)


def test_a_map_on_its_target_gathers_there_and_differs_on_the_wrong_voxels():
    reference = np.zeros((8, 8, 8), np.uint8)
    reference[2:4, 2:4, 2:4] = 2                             # 8 of 512 voxels
    prediction = reference.copy()
    prediction[2, 2, 2] = 0                                  # one wrong voxel, inside the map
    values = (reference == 2).astype(float)
    figures = map_information(values, reference, prediction, target_value=2)
    assert figures["entropy_ratio"] == pytest.approx(math.log(8) / math.log(512))
    assert figures["target_mass"] == pytest.approx(1.0) and figures["enrichment"] == pytest.approx(64.0)
    assert figures["mean_in_target"] == 1.0 and figures["mean_outside"] == 0.0
    assert figures["wrong_minus_right"] == pytest.approx(1.0 - 7 / 511)
    assert not is_flat(figures) and not is_blind(figures)
    # measured against another class (absent here), the map has no target
    assert map_information(values, reference, prediction, target_value=1)["enrichment"] is None


def test_a_map_must_be_finite_and_non_negative():
    labels = np.zeros((2, 2, 2), np.uint8)
    with pytest.raises(ValueError, match="finite values >= 0"):
        map_information(np.full((2, 2, 2), -1.0), labels, labels)


@pytest.fixture(scope="module")
def information():
    """Package name -> map volume -> mean figures over CASES (computed once per package)."""
    measured = {}

    def measure(name: str) -> dict[str, dict]:
        if name not in measured:
            package = load_package(name)
            data, root = dataset_description(package.card, None, None)
            assert set(CASES) <= set(package.card["training"]["validation_cases"])
            cases = [c for c in find_cases(data, root) if c.name in CASES]
            evaluation = evaluate_cases(Predictor(package, device="cpu", with_maps=True), cases, data, progress=False)
            measured[name] = summarize_map_information(evaluation)
        return measured[name]
    return measure


def _channels(figures: dict[str, dict], name: str) -> dict[str, dict]:
    channels = {v: f for v, f in figures.items() if v == name or v.rpartition(".")[0] == name}
    assert channels, f"{name} was not measured; measured: {sorted(figures)}"
    return channels


@pytest.mark.parametrize("package,name", [_weak(p, n, test="flat") for p, n in SHIPPED_MAPS])
def test_shipped_map_is_not_flat(information, package, name):
    channels = _channels(information(package), name)
    variation = {v: f["variation"] for v, f in channels.items()}
    assert not all(is_flat(f) for f in channels.values()), f"{package} {name} is flat: variation {variation}"


@pytest.mark.parametrize("package,name", [_weak(p, n, test="blind") for p, n in SHIPPED_MAPS])
def test_shipped_map_is_not_blind_to_the_hippocampus(information, package, name):
    channels = _channels(information(package), name)
    enrichment = {v: f["enrichment"] for v, f in channels.items()}
    assert not all(is_blind(f) for f in channels.values()), f"{package} {name} is blind: enrichment {enrichment}"


@pytest.mark.parametrize("package,name", [_weak(p, n, test="places") for p, n in SHIPPED_MAPS
                                          if n in ("category_attention", "coarse_segmentation")])
def test_class_channel_map_reads_high_inside_its_own_class(information, package, name):
    """Channel k of a class-channel map is trained toward 1 inside class k: its mean there is >= 0.5."""
    channels = _channels(information(package), name)
    inside = {v: f["mean_in_target"] for v, f in channels.items() if not v.endswith(".background")}
    assert len(inside) == 2 and all(value >= 0.5 for value in inside.values()), inside


@pytest.mark.parametrize("package,name", SHIPPED_MAPS)
def test_shipped_card_gives_each_map_a_unit_and_a_display_range(package, name):
    entry = load_package(package).maps[name]
    assert isinstance(entry.get("unit"), str) and entry["unit"]
    first, last = entry["display_range"]
    # high to low exactly for a map high where the segmentation is sure (the confidence)
    assert (first > last) == (name in load_package(package).build_network().maps_high_when_sure)
    assert name in load_package(package).card["metrics"]["map_information"] or any(
        v.rpartition(".")[0] == name for v in load_package(package).card["metrics"]["map_information"])


def test_display_range_spans_the_channels_of_a_map():
    information = {"a.0": {"value_p01": 0.02, "value_p99": 0.5}, "a.1": {"value_p01": 0.01, "value_p99": 0.9},
                   "b": {"value_p01": 0.123456, "value_p99": 0.98765}}
    assert display_ranges(["a", "b"], information) == {"a": [0.01, 0.9], "b": [0.123, 0.988]}
    assert display_ranges(["a", "b"], information, high_when_sure=("b",)) == {"a": [0.01, 0.9], "b": [0.988, 0.123]}


def test_the_review_map_is_the_doubt_map_that_finds_the_errors_with_the_best_precision():
    """``apply_review`` ranks the card's doubt maps by average precision, not AUROC (on which the mere
    nearness to the boundary scores 0.98), never names the boundary baseline, which is no map of the
    model's, and keeps the uncertainty unless a map beats it by more than REVIEW_MARGIN."""
    def figures(auroc, precision):
        return {"auroc": auroc, "average_precision": precision, "effort": np.linspace(0, 1, len(EFFORT_FRACTIONS))}

    evaluation = Evaluation(calibration=np.ones((3, 10)))
    for case, shift in (("a", 0.0), ("b", 0.02)):
        evaluation.review[case] = {"wrong_fraction": 0.01, "maps": {
            "uncertainty": figures(0.94, 0.37 + shift), "difficulty": figures(0.99, 0.33 + shift),
            BOUNDARY_BASELINE: figures(0.98, 0.60)}}
        evaluation.error_detection[case] = {"uncertainty": 0.94, "difficulty": 0.99}
    card = {"maps": {"difficulty": {}, "confidence": {}}, "inference": {"review_map": "difficulty"}}
    apply_review(card, evaluation)
    assert card["inference"]["review_map"] == "uncertainty"
    assert card["metrics"]["error_detection_average_precision"] == {"uncertainty": 0.38, "difficulty": 0.34,
                                                                    BOUNDARY_BASELINE: 0.6}
    assert card["metrics"]["error_detection_auroc"] == {"difficulty": 0.99, "uncertainty": 0.94}
    assert card["metrics"]["wrong_fraction"] == 0.01 and set(card["metrics"]["found_within_5_percent"]) == {
        "uncertainty", "difficulty", BOUNDARY_BASELINE}
    evaluation.review["a"]["maps"]["difficulty"] = figures(0.99, 0.39)  # 0.37 on average: level with it
    apply_review(card, evaluation)
    assert card["inference"]["review_map"] == "uncertainty"
    evaluation.review["a"]["maps"]["difficulty"] = figures(0.99, 0.45)  # 0.40, clear of the 0.01 margin
    assert apply_review(card, evaluation)["maps"]["difficulty"]["average_precision"] == 0.4
    assert card["inference"]["review_map"] == "difficulty"
