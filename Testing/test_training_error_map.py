"""training.error_map: the shipped difficulty-aware package's confidence network retrained on where its
frozen segmenter is wrong, on real hippocampus cases."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from AttnSegLib.package import load_package
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
    assert error_map.main(["--model", str(SHIPPED), "--output", str(out), "--cases", "2", "--epochs", "1"]) == 0
    before, after = load_package(SHIPPED), load_package(out)
    segmenter = [k for k in before.weights if k.startswith("segmenter.")]
    confidence = [k for k in before.weights if k.startswith("confidence_net.")]
    assert segmenter and confidence
    assert all(torch.equal(before.weights[k], after.weights[k]) for k in segmenter)
    assert any(not torch.equal(before.weights[k], after.weights[k]) for k in confidence)
    note = after.card["training"]["confidence_network"]
    assert note["cases"] == 2 and note["epochs"] == 1 and note["initialised_from"] == before.card["weights_sha256"]
    assert "segmentation is right" in after.card["maps"]["confidence"]["meaning"]


def test_other_architectures_are_refused(tmp_path, capsys):
    unet = SHIPPED.parent / "hippocampus_unet"
    assert error_map.main(["--model", str(unet), "--output", str(tmp_path / "x")]) == 2
    assert "difficulty_aware" in capsys.readouterr().err

