"""The model card parsed once into a frozen ModelCard: shipped cards round-trip unchanged, defaults live in
one place, the map entries' optional display range and unit are read, each map's measured information is
put in words from the card alone (as the panel and the page show it), and ``attnseg info`` shows each
package's validation Dice through :attr:`ModelCard.validation_dice` (as the web page and the panel do)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from AttnSegLib import cli
from AttnSegLib.card import InferenceSettings, ModelCard, PackageError
from AttnSegLib.errors import AttnSegError
from AttnSegLib.map_information import map_information
from AttnSegLib.outputs import display_range, information_note, map_meaning
from AttnSegLib.package import available_packages, load_package
from conftest import REPO

SHIPPED = sorted(p for p in (REPO / "Resources" / "Models").iterdir() if (p / "model.json").is_file())


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_card_round_trips_unchanged(folder: Path):
    raw = json.loads((folder / "model.json").read_text())
    card = load_package(folder).card  # also checks the weights' sha256 against the card
    assert card.to_dict() == raw and card == raw
    assert card.name == raw["name"] and card.architecture == raw["architecture"]["name"]
    assert card.class_names == [c["name"] for c in raw["classes"]]
    assert card.validation_dice == raw["metrics"]["mean_dice"]  # the key training/export.py writes


def test_the_card_is_frozen_and_hands_out_copies():
    card = load_package(SHIPPED[0]).card
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.name = "other"
    with pytest.raises(TypeError):
        card.classes[0]["name"] = "other"
    card["classes"][0]["name"] = "changed"  # a copy
    assert card.class_names[0] == card.to_dict()["classes"][0]["name"] != "changed"


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: p.name)
def test_training_record_is_read_through_the_fields(folder: Path):
    raw = json.loads((folder / "model.json").read_text())
    card = load_package(folder).card
    training = raw.get("training") or {}
    assert card.training_config == training.get("config")
    assert card.held_out_case_names == (training.get("validation_cases") or [])
    assert card.training_dataset == training.get("dataset")
    if card.training_config is not None:
        card.training_config["data"]["root"] = "changed"  # a new copy each time
        assert card.training_config == training["config"]


def test_with_temperature_changes_only_the_temperature():
    card = load_package(SHIPPED[0]).card
    scaled = card.with_temperature(2.5)
    assert scaled.inference.temperature == 2.5 and card.inference == dataclasses.replace(
        scaled.inference, temperature=card.inference.temperature)
    expected = card.to_dict()
    expected["inference"] = {**expected.get("inference", {}), "temperature": 2.5}
    assert scaled.to_dict() == expected


def test_defaults_are_the_inference_settings():
    card = dict(json.loads((SHIPPED[0] / "model.json").read_text()))
    card.pop("inference")
    parsed = ModelCard.parse(card)
    assert parsed.inference == InferenceSettings()
    assert (parsed.inference.overlap, parsed.inference.batch_size, parsed.inference.tta_flip_axes) == (0.5, 2, (0, 1, 2))


def test_map_entries_may_carry_a_display_range_and_a_unit():
    raw = json.loads((REPO / "Resources" / "Models" / "hippocampus_difficulty_aware" / "model.json").read_text())
    raw["maps"]["confidence"] = {**raw["maps"]["confidence"], "display_range": [0.2, 0.9], "unit": "fraction"}
    card = ModelCard.parse(raw)
    assert card.map_spec("confidence").display_range == (0.2, 0.9) and card.map_spec("confidence").unit == "fraction"
    assert display_range("confidence", np.zeros(3), card) == (0.2, 0.9)
    # the uncertainty is drawn from the doubt of a label given 99 %, whatever its values
    assert display_range("uncertainty", np.zeros(3), card, class_count=3) == (0.0573, 1.0)
    assert display_range("uncertainty", np.zeros(3), None, class_count=2) == (0.0808, 1.0)
    assert map_meaning("difficulty", card) == raw["maps"]["difficulty"]["meaning"]
    raw["maps"]["confidence"]["display_range"] = [1.0, 0.6]  # high to low: a confidence's doubt drawn bright
    assert display_range("confidence", np.zeros(3), ModelCard.parse(raw)) == (1.0, 0.6)
    raw["maps"]["confidence"]["display_range"] = [0.5, 0.5]
    with pytest.raises(PackageError, match="'maps' must be an object") as error:
        ModelCard.parse(raw)
    assert isinstance(error.value, AttnSegError)


def _card_measuring(maps: dict) -> ModelCard:
    """The difficulty-aware card with ``metrics.map_information`` measured (AttnSegLib.map_information)
    on the given map volumes of a 10 x 10 x 10 case: a cube of Anterior (value 1) and one of Posterior (2),
    the prediction wrong on one slab."""
    reference = np.zeros((10, 10, 10), np.int64)
    reference[2:5, 2:5, 2:5], reference[6:9, 6:9, 6:9] = 1, 2
    prediction = reference.copy()
    prediction[2] = 0
    raw = json.loads((REPO / "Resources" / "Models" / "hippocampus_difficulty_aware" / "model.json").read_text())
    raw["metrics"]["map_information"] = {name: map_information(values, reference, prediction, target)
                                         for name, (values, target) in maps.items()}
    return ModelCard.parse(raw)


def test_the_measured_information_of_a_map_is_put_in_words_from_its_card():
    on_anterior = np.full((10, 10, 10), 0.1)
    on_anterior[2:5, 2:5, 2:5] = 0.9
    flat = np.full((10, 10, 10), 0.5)
    flat[0, 0, 0] = 0.51
    card = _card_measuring({"difficulty": (on_anterior, None), "gate.anterior": (on_anterior, 1),
                            "confidence": (flat, None)})
    figures = card.map_information("gate.anterior")
    note = information_note(card, "gate.anterior")
    # A channel named after a class is measured against that class, any other map against the foreground.
    assert note.startswith("Measured on its validation cases (model card): inside Anterior "
                           f"{figures['enrichment']:.2f}x its average (mean 0.9 there, 0.1 outside); "
                           f"entropy {figures['entropy_ratio']:.3f} of a flat map; 90 % of voxels at ")
    assert f"{figures['wrong_minus_right']:.2g} higher on the model's wrong voxels" in note
    assert "inside Anterior + Posterior" in information_note(card, "difficulty")
    assert information_note(card, "confidence").endswith(
        "Nearly flat (it varies by less than 2.5% of its mean): it shows little.")
    # A map the card has no figures for (the uncertainty, a class probability) gets no note.
    assert card.map_information("uncertainty") is None and information_note(card, "uncertainty") == ""
    assert information_note(None, "difficulty") == ""


def test_a_map_blind_to_its_target_is_called_so():
    values = np.random.default_rng(0).uniform(0.4, 0.6, (10, 10, 10))
    card = _card_measuring({"difficulty": (values, None)})
    figures = card.map_information("difficulty")
    assert abs(figures["enrichment"] - 1) < 0.05  # the case is built so: the noise is the same everywhere
    assert information_note(card, "difficulty").endswith(
        "Blind to Anterior + Posterior: its mean there is within 5% of its average.")


def test_info_shows_each_packages_validation_dice(capsys, monkeypatch):
    monkeypatch.delenv("ATTNSEG_MODELS", raising=False)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    shipped = [load_package(p) for p in available_packages() if p.parent == REPO / "Resources" / "Models"]
    assert shipped
    for package in shipped:
        line = next(line for line in out.splitlines() if f" {package.name} " in line)
        assert f"validation Dice {package.card.validation_dice:.3f}" in line, line
    assert cli.main(["info", "--model", "hippocampus_unet"]) == 0
    card = load_package("hippocampus_unet").card
    assert f"validation mean Dice {card.validation_dice:.4f} on {card.validation_cases} cases" in capsys.readouterr().out


def test_a_programming_error_is_not_taken_for_a_user_error(monkeypatch, capsys):
    """FAULT INJECTION — a bug cannot be made on purpose in shipped code: ``info`` is replaced by a command
    that fails as a bug would. The CLI answers an AttnSegError with exit 2 and one line; anything else is
    raised (a traceback), never printed as the user's mistake."""
    def buggy(args):
        raise ValueError("a bug, not the user's mistake")

    monkeypatch.setattr(cli, "cmd_info", buggy)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["info"])
    assert "attnseg: error" not in capsys.readouterr().err
    monkeypatch.undo()
    assert cli.main(["info", "--model", str(REPO / "no_such_package")]) == 2  # a user error: one line, exit 2
