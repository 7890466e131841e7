"""training.error_map: the shipped difficulty-aware package's confidence network retrained on where its
frozen segmenter is wrong, on real hippocampus cases."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from AttnSegLib.package import load_package, save_package
from training import error_map

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHIPPED = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "hippocampus_difficulty_aware"


def test_a_random_window_keeps_input_and_target_together():
    volume = torch.arange(2 * 6 * 8 * 6, dtype=torch.float32).reshape(2, 6, 8, 6)
    target = volume[:1] * 10
    rng = random.Random(0)
    for _ in range(10):
        window, window_target = error_map.random_window(volume, target, (4, 8, 4), [3], rng)
        assert window.shape == (2, 4, 8, 4) and window_target.shape == (1, 4, 8, 4)
        torch.testing.assert_close(window_target, window[:1] * 10)


def test_only_the_confidence_network_learns(tmp_path):
    out = tmp_path / "retrained"
    assert error_map.main(["--model", str(SHIPPED), "--output", str(out), "--cases", "2", "--epochs", "1",
                           "--perturbed-copies", "0"]) == 0
    before, after = load_package(SHIPPED), load_package(out)
    segmenter = [k for k in before.weights if k.startswith("segmenter.")]
    confidence = [k for k in before.weights if k.startswith("confidence_net.")]
    assert segmenter and confidence
    assert all(torch.equal(before.weights[k], after.weights[k]) for k in segmenter)
    assert any(not torch.equal(before.weights[k], after.weights[k]) for k in confidence)
    note = after.card["training"]["confidence_network"]
    assert note["cases"] == 2 and note["epochs"] == 1 and note["initialised_from"] == before.card["weights_sha256"]
    assert "segmentation is right" in after.card["maps"]["confidence"]["meaning"]


def test_a_coarse_confidence_network_is_trained_anew_on_the_cases_and_their_perturbed_copies(tmp_path, capsys):
    out = tmp_path / "coarse"
    assert error_map.main(["--model", str(SHIPPED), "--output", str(out), "--cases", "2", "--epochs", "1",
                           "--coarse", "--perturbed-copies", "1"]) == 0
    assert "4 training cases through the frozen segmenter" in capsys.readouterr().out  # 2 cases, 2 copies
    before, after = load_package(SHIPPED), load_package(out)
    assert after.card.network_kwargs == {**before.card.network_kwargs, "coarse_confidence": True}
    assert all(torch.equal(before.weights[k], after.weights[k]) for k in before.weights if k.startswith("segmenter."))
    assert "confidence_net.sureness.weight" in after.weights
    note = after.card["training"]["confidence_network"]
    assert (note["cases"], note["perturbed_copies"], note["initialised_from"]) == (2, 1, "new (coarse_confidence)")
    assert after.card["maps"]["difficulty"]["unit"] == "(1 - probability right)^2 (1 = surely wrong)"
    assert after.build_network().confidence_net.coarse


def test_perturbed_copies_move_image_and_label_together():
    """The copies go through S's training augmentation with every transform on: the image changes, and
    the label moves with it (the same affine), keeping its classes."""
    case = error_map.Case("a", np.zeros((1, 16, 20, 16), np.float32), np.zeros((16, 20, 16), np.uint8))
    case.image[0, 4:12, 6:14, 4:12] = 2.0
    case.label[4:12, 6:14, 4:12] = 1
    augmentation = {"flip_axes": [2], "flip_prob": 0.5, "affine_prob": 0.2, "rotate_deg": 15, "scale": [0.85, 1.15],
                    "intensity_scale_prob": 0.2, "intensity_scale": 0.1}
    copies = error_map.perturbed_copies([case], augmentation, copies=2, seed=0)
    assert [c.name for c in copies] == ["a (perturbed 1)", "a (perturbed 2)"]
    for copy in copies:
        assert copy.image.shape == case.image.shape and copy.label.dtype == np.uint8
        assert not np.array_equal(copy.label, case.label) and set(np.unique(copy.label)) == {0, 1}
        inside, outside = copy.image[0][copy.label == 1], copy.image[0][copy.label == 0]
        assert inside.mean() > 1.5 and outside.mean() < 0.5  # the object and its label moved together
    assert not np.array_equal(copies[0].label, copies[1].label)


def test_a_transform_the_segmenter_was_trained_without_stays_off_in_the_copies():
    """Probability 0 in the card's augmentation: S never saw that transform, so its copies do not either
    (only the probabilities above 0 go to 1)."""
    case = error_map.Case("a", np.zeros((1, 16, 20, 16), np.float32), np.zeros((16, 20, 16), np.uint8))
    case.image[0, 4:12, 6:14, 4:12] = 2.0
    case.label[4:12, 6:14, 4:12] = 1
    augmentation = {"affine_prob": 0.0, "rotate_deg": 15, "scale": [0.85, 1.15], "noise_prob": 0.0, "noise_std": 0.05,
                    "intensity_shift_prob": 0.2, "intensity_shift": 0.1}
    copy, = error_map.perturbed_copies([case], augmentation, copies=1, seed=0)
    np.testing.assert_array_equal(copy.label, case.label)  # no rotation or scaling
    shift = copy.image - case.image
    assert np.ptp(shift) < 1e-6 and abs(float(shift.mean())) > 0  # one intensity shift, no noise


@pytest.mark.parametrize("option", [["--cases", "0"], ["--perturbed-copies", "-1"]])
def test_counts_that_train_on_nothing_are_refused(tmp_path, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        error_map.main(["--model", str(SHIPPED), "--output", str(tmp_path / "x"), *option])
    assert exit_.value.code == 2 and option[0] in capsys.readouterr().err


def test_copies_from_a_card_without_its_training_config_are_refused(tmp_path, capsys):
    """With --data the cases are found without the card's training config, but not the augmentation."""
    shipped = load_package(SHIPPED)
    card = shipped.card.to_dict()
    del card["training"]["config"]
    package = save_package(tmp_path / "no_config", card, shipped.weights)
    config = SHIPPED.parents[2] / "training" / "configs" / "hippocampus_difficulty_aware.yaml"
    args = ["--model", str(package.path), "--output", str(tmp_path / "x"), "--data", str(config), "--cases", "1"]
    assert error_map.main(args) == 2
    assert "--perturbed-copies 0" in capsys.readouterr().err


def test_other_architectures_are_refused(tmp_path, capsys):
    unet = SHIPPED.parent / "hippocampus_unet"
    assert error_map.main(["--model", str(unet), "--output", str(tmp_path / "x")]) == 2
    assert "difficulty_aware" in capsys.readouterr().err

