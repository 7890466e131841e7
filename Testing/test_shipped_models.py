"""Every model package shipped in Resources/Models: it loads, its card carries measured validation
metrics and a review map it was measured against, and it segments real held-out data through the
``attnseg`` command: the hippocampus models on the shipped sample, the two-modality tumour model on its
held-out BraTS case (FLAIR + T1c, two ``--input``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AttnSegLib.cli import main
from AttnSegLib.image import read_image
from AttnSegLib.metrics import evaluate_labels
from AttnSegLib.package import default_package_name, load_package
from training.map_display import choose_review_map

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "Resources" / "Models"
SAMPLE_IMAGE = REPO / "Resources" / "SampleData" / "hippocampus_001_image.nii.gz"
SAMPLE_LABEL = REPO / "Resources" / "SampleData" / "hippocampus_001_label.nii.gz"
SHIPPED = sorted(p.name for p in MODELS.iterdir() if (p / "model.json").is_file())
HIPPOCAMPUS = [name for name in SHIPPED if name.startswith("hippocampus_")]
ENSEMBLES = [name for name in HIPPOCAMPUS  # tested in test_ensemble.py
             if json.loads((MODELS / name / "model.json").read_text())["architecture"]["name"] == "ensemble"]


def test_every_architecture_is_shipped_and_the_default_is_the_best_hippocampus_model():
    """The default is the best single network; an ensemble of them (slower by its member count) is not a candidate."""
    networks = [name for name in HIPPOCAMPUS if name not in ENSEMBLES]
    architectures = {load_package(name).card["architecture"]["name"] for name in networks}
    assert architectures == {"unet", "dam_al", "cga_unet", "difficulty_aware", "rsanet", "mda_unet"}
    dice = {name: load_package(name).card["metrics"]["mean_dice"] for name in networks}
    assert default_package_name() == max(dice, key=dice.get)
    assert min(dice.values()) >= 0.85, dice


@pytest.mark.parametrize("name", SHIPPED)
def test_card_holds_measured_metrics_and_a_measured_review_map(name):
    card = load_package(name).card
    metrics = card["metrics"]
    assert metrics["split"] == "validation" and metrics["cases"] == len(card["training"]["validation_cases"])
    assert set(metrics["dice"]) == {c["name"] for c in card["classes"][1:]}
    precision = metrics["error_detection_average_precision"]  # measured per doubt map, boundary baseline too
    assert card["inference"]["review_map"] == choose_review_map(precision, card["maps"])
    assert set(precision) == set(metrics["found_within_5_percent"]) >= {"uncertainty", "boundary distance"}
    assert card["training"]["licence"] and card["training"]["attribution"]
    assert sum(f.stat().st_size for f in (MODELS / name).iterdir()) < 8e6  # a few MB


@pytest.mark.parametrize("name", HIPPOCAMPUS)
def test_hippocampus_model_segments_the_held_out_sample(name, tmp_path, capsys):
    assert "hippocampus_001" in load_package(name).card["training"]["validation_cases"]
    assert main(["segment", "-i", str(SAMPLE_IMAGE), "-o", str(tmp_path), "--model", name]) == 0
    labels, reference = read_image(tmp_path / "labels.nii.gz"), read_image(SAMPLE_LABEL)
    assert labels.geometry.same_grid(reference.geometry)
    scores = evaluate_labels(labels, reference, reference.geometry.spacing, {1: "Anterior", 2: "Posterior"})
    assert all(s["dice"] > 0.8 for s in scores.values()), scores
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["review_map"] == "uncertainty"


@pytest.fixture
def brats_case(data_dir):
    package = load_package("brats_sample_unet")
    (case,) = package.card["training"]["validation_cases"]
    folder = data_dir / "brats_sample" / case
    if not folder.is_dir():
        pytest.skip(f"{folder} is missing: the BraTS sample of ../shared/data (or $ATTNSEG_DATA)")
    return folder


def test_two_modality_model_segments_its_held_out_case_from_two_inputs(brats_case, tmp_path, capsys):
    """Multi-modal end to end. Three training cases make a weak tumour model; the bar is the measured
    whole-tumour overlap with a margin, and the shape of every output."""
    flair, t1c = brats_case / "Flair_subtrMeanDivStd.nii.gz", brats_case / "T1c_subtrMeanDivStd.nii.gz"
    assert main(["segment", "-i", str(flair), "-i", str(t1c), "-o", str(tmp_path),
                 "--model", "brats_sample_unet"]) == 0
    reference = read_image(brats_case / "OTMultiClass.nii.gz")
    labels = read_image(tmp_path / "labels.nii.gz")
    assert labels.geometry.same_grid(reference.geometry)
    assert set(np.unique(labels.array)) <= {0, 1, 2, 3, 4}
    predicted, expert = labels.array > 0, reference.array > 0
    whole_tumour_dice = 2 * (predicted & expert).sum() / (predicted.sum() + expert.sum())
    assert whole_tumour_dice > 0.45, whole_tumour_dice  # measured 0.536
    report = json.loads((tmp_path / "report.json").read_text())
    assert [Path(p).name for p in report["inputs"]] == [flair.name, t1c.name]
    assert sitk.ReadImage(str(tmp_path / "probabilities.nii.gz")).GetNumberOfComponentsPerPixel() == 5
