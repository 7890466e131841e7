"""Temperature scaling: the fit recovers a known temperature, and the card refuses an unusable one."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from AttnSegLib.package import PackageError, validate_card
from training.calibrate import fit_temperature

REPO = Path(__file__).resolve().parents[1]


def test_fit_recovers_the_temperature_the_labels_were_drawn_at():
    """Labels drawn from softmax(z / 2): the negative log-likelihood is lowest at T = 2."""
    generator = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(200_000, 3, generator=generator)
    labels = torch.multinomial(torch.softmax(logits / 2.0, dim=1), 1, generator=generator)[:, 0]
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.03)
    # Labels that always follow the argmax: sharper is always better, up to the card's lower bound.
    assert fit_temperature(logits, logits.argmax(dim=1)) == pytest.approx(0.05)


def test_the_card_refuses_a_temperature_it_cannot_use():
    card = json.loads((REPO / "Resources" / "Models" / "hippocampus_difficulty_aware" / "model.json").read_text())
    validate_card(card, "shipped")
    for bad in (0, -1.0, "1.5", 100.0, float("nan")):
        broken = copy.deepcopy(card)
        broken["inference"]["temperature"] = bad
        with pytest.raises(PackageError, match="'inference.temperature' must be a number from 0.05 to 20"):
            validate_card(broken, "card")
