"""The shipped ensemble package: its card names member packages, the same loader and Predictor run it
on a real hippocampus crop (the mean of the members' calibrated probabilities, and their disagreement),
the CLI segments and describes it, and a card whose members are missing, changed or unlike it is
refused in one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from AttnSegLib.cli import main
from AttnSegLib.image import read_image
from AttnSegLib.inference import Predictor
from AttnSegLib.metrics import evaluate_labels
from AttnSegLib.package import PackageError, ensemble_sha256, load_package

from test_reliability_cli import assert_one_error

REPO = Path(__file__).resolve().parents[1]
ENSEMBLE = "hippocampus_ensemble"
SAMPLE_IMAGE = REPO / "Resources" / "SampleData" / "hippocampus_001_image.nii.gz"
SAMPLE_LABEL = REPO / "Resources" / "SampleData" / "hippocampus_001_label.nii.gz"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ensemble():
    return load_package(ENSEMBLE)


@pytest.fixture(scope="module")
def sample():
    return read_image(SAMPLE_IMAGE)


def test_card_lists_installed_members_of_the_same_task(ensemble):
    card = ensemble.card
    assert card.architecture == "ensemble" and len(card.members) >= 2
    assert [m.name for m in ensemble.members] == list(card.members)
    assert ensemble.weights == {} and card.weights_sha256 == ensemble_sha256(list(ensemble.members))
    for member in ensemble.members:
        assert member.card.class_names == card.class_names and member.card.spacing_xyz_mm == card.spacing_xyz_mm
        assert set(card.held_out_case_names) <= set(member.card.held_out_case_names)
    assert "disagreement" in card.maps and card.inference.review_map in ("uncertainty", "disagreement")


def test_the_shipped_card_is_what_training_ensemble_writes_before_measuring(ensemble):
    """Every fact of the card but what training.ensemble measured (metrics, temperature, review map, the
    map's display range) comes from its members as ``ensemble_card`` takes it."""
    from training.ensemble import ensemble_card

    written, shipped = ensemble_card(ENSEMBLE, list(ensemble.members)), ensemble.card.to_dict()
    measured = ("metrics", "inference", "maps")
    assert {k: v for k, v in written.items() if k not in measured} == {
        k: v for k, v in shipped.items() if k not in measured}
    review_map = shipped["inference"].pop("review_map")
    assert written["inference"] == {**shipped["inference"], "temperature": 1.0} and review_map == "uncertainty"
    assert shipped["metrics"]["cases"] == len(shipped["training"]["validation_cases"]) == 40


def test_segments_a_real_crop_as_the_mean_of_its_members(ensemble, sample):
    """On the sample (held out by every member): Dice > 0.8; at the card's temperature 1 the probabilities
    are the mean of the members' own (each at its own temperature); the disagreement map is in [0, 1]
    and higher where the members' labels differ than where they agree."""
    result = Predictor(ensemble, device="cpu").predict([sample])
    reference = read_image(SAMPLE_LABEL)
    scores = evaluate_labels(result.labels, reference, reference.geometry.spacing, {1: "Anterior", 2: "Posterior"})
    assert all(s["dice"] > 0.8 for s in scores.values()), scores
    assert set(result.maps) == {"uncertainty", "disagreement"}
    assert result.review_map_name == ensemble.card.inference.review_map

    untempered = Predictor(ensemble.build_network(), card=ensemble.card.with_temperature(1.0), device="cpu")
    averaged = untempered.predict([sample])
    members = [Predictor(m, device="cpu", with_maps=False).predict([sample]) for m in ensemble.members]
    mean = np.mean([m.probabilities.array for m in members], axis=0)
    np.testing.assert_allclose(averaged.probabilities.array, mean, atol=2e-4)

    disagreement = result.maps["disagreement"].array
    assert disagreement.min() >= 0.0 and disagreement.max() <= 1.0
    differ = np.any([m.labels.array != members[0].labels.array for m in members[1:]], axis=0)
    assert differ.any() and (~differ).any()
    assert disagreement[differ].mean() > 5 * disagreement[~differ].mean()


def test_cli_segments_with_the_ensemble_and_info_names_its_members(tmp_path, capsys):
    assert main(["segment", "-i", str(SAMPLE_IMAGE), "-o", str(tmp_path), "--model", ENSEMBLE]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["provenance"]["model"] == ENSEMBLE
    disagreement = read_image(tmp_path / "maps" / "disagreement.nii.gz")
    assert disagreement.array.shape == read_image(tmp_path / "labels.nii.gz").array.shape
    capsys.readouterr()
    assert main(["info", "--model", ENSEMBLE]) == 0
    text = capsys.readouterr().out
    assert "architecture ensemble" in text and all(m in text for m in load_package(ENSEMBLE).card.members)


def _copy(package, folder: Path, new_name: str, **card_changes) -> Path:
    """The installed ``package`` copied into ``folder`` as ``new_name``, with its card changed."""
    target = folder / new_name
    shutil.copytree(package.path, target)
    card = json.loads((target / "model.json").read_text())
    card.update(name=new_name, **card_changes)
    (target / "model.json").write_text(json.dumps(card))
    return target


@pytest.mark.parametrize("change, phrase", [
    ("missing member", "ensemble member 'no_such_package' cannot be used"),
    ("member of other classes", "has classes"),
    ("member of other spacing", "has spacing_xyz_mm"),
    ("member changed", "a member package changed since the ensemble card was written"),
    ("member is an ensemble", "is itself an ensemble"),
    ("one member", "two or more distinct package names"),
])
def test_a_bad_ensemble_card_is_refused_in_one_line(change, phrase, ensemble, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATTNSEG_MODELS", str(tmp_path))
    card = ensemble.card.to_dict()
    members = list(card["architecture"]["kwargs"]["members"])
    first = ensemble.members[0]
    if change == "missing member":
        members[-1] = "no_such_package"
    elif change == "member of other classes":
        classes = first.card.to_dict()["classes"]
        classes[1]["name"] = "Head"
        _copy(first, tmp_path, "renamed_classes", classes=classes)
        members[0] = "renamed_classes"
        card["weights_sha256"] = ensemble_sha256([load_package("renamed_classes"), *ensemble.members[1:]])
    elif change == "member of other spacing":
        _copy(first, tmp_path, "other_spacing", spacing_xyz_mm=[0.5, 0.5, 0.5])
        members[0] = "other_spacing"
        card["weights_sha256"] = ensemble_sha256([load_package("other_spacing"), *ensemble.members[1:]])
    elif change == "member changed":
        card["weights_sha256"] = "0" * 64
    elif change == "member is an ensemble":
        members[0] = ENSEMBLE
    else:
        members = members[:1]
    card["architecture"]["kwargs"]["members"] = members
    folder = tmp_path / "bad_ensemble"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(PackageError, match="bad_ensemble"):
        load_package(folder)
    capsys.readouterr()
    assert main(["segment", "-i", str(SAMPLE_IMAGE), "-o", str(tmp_path / "out"), "--model", str(folder)]) == 2
    assert_one_error(capsys.readouterr().err.strip().splitlines(), phrase)
