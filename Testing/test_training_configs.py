"""Configs are strict and the shipped packages are reproducible from them: every shipped card's training
config is exactly what its committed config loads to; unknown keys at any depth, kwargs the
architecture does not take and an ``init_from`` that cannot be loaded are refused with one line naming
the key; kwargs are compared by the network they build."""
from __future__ import annotations

import json

import pytest

from AttnSegLib import models
from AttnSegLib.package import available_packages, load_package
from training.config import CONFIG_DIR, ConfigError, load_config

SHIPPED = [p for p in available_packages() if (p / "model.json").is_file() and "Resources" in str(p)]


def test_every_shipped_package_is_one_of_the_committed_configs():
    """An ensemble trains nothing (``python -m training.ensemble`` writes its card from its members):
    each of its members must be a shipped package, which this test holds to its own config."""
    assert len(SHIPPED) >= 7
    shipped_names = {path.name for path in SHIPPED}
    for path in SHIPPED:
        card = json.loads((path / "model.json").read_text())
        if card["architecture"]["name"] == "ensemble":
            members = card["architecture"]["kwargs"]["members"]
            assert members and set(members) <= shipped_names, f"{card['name']}: members {members}"
            continue
        assert (CONFIG_DIR / f"{card['name']}.yaml").is_file(), f"{card['name']}: no committed config"
        assert load_config(card["name"]) == card["training"]["config"], (
            f"{card['name']}: training/configs/{card['name']}.yaml does not load to the config its card was "
            "trained with")


def test_the_default_model_config_says_what_its_card_says():
    """The issue's example: the card says Adam lr 0.003, poly, warm-up 50, no beta."""
    config = load_config("hippocampus_difficulty_aware")
    assert config["optimizer"]["name"] == "adam" and config["optimizer"]["lr"] == 0.003
    assert config["schedule"] == {"name": "poly", "power": 0.9, "warmup_iterations": 50}
    assert config["model"]["kwargs"] == {"base_features": 8, "depth": 4}


@pytest.mark.parametrize("override, message", [
    ({"training": {"iteration": 10}}, "unknown key training.iteration; did you mean 'iterations'?"),
    ({"optimizer": {"learning_rate": 0.1}}, "unknown key optimizer.learning_rate; did you mean 'lr'?"),
    ({"model": {"init_form": "hippocampus_unet"}}, "unknown key model.init_form; did you mean 'init_from'?"),
    ({"training": {"early_stopping": {"patiense": 3}}}, "unknown key training.early_stopping.patiense; did you mean 'patience'?"),
    ({"data": {"modalities": [{"name": "T1", "normalisation": "zscore"}]}},
     "unknown key data.modalities[0].normalisation; did you mean 'normalization'?"),
    ({"model": {"kwargs": {"base_feature": 8}}},
     "unknown key model.kwargs.base_feature for difficulty_aware; did you mean 'base_features'?"),
    ({"loss": {"weights": {"lamda_adv": 0.1}}}, "unknown key loss.weights.lamda_adv for difficulty_aware's loss; did you mean 'lambda_adv'?"),
    ({"model": {"init_from": "no_such_package"}}, "model.init_from cannot be used: no model package 'no_such_package'"),
    ({"fine_tuning": {"replay_fraction": 0.5}}, "fine_tuning needs model.init_from"),
    ({"model": {"init_from": "hippocampus_unet", "warm_start": "hippocampus_unet"}},
     "model.init_from and model.warm_start both name starting weights; keep one"),
    ({"model": {"init_from": "hippocampus_difficulty_aware"}, "fine_tuning": {"replay_fraction": 2}},
     "fine_tuning.replay_fraction must be between 0 and 1"),
    ({"model": {"architecture": "difficulty_awre"}}, "did you mean 'difficulty_aware'?"),
])
def test_config_mistakes_are_refused_with_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("hippocampus_difficulty_aware", override)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_yaml_typo_in_a_section_is_refused_from_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("base: hippocampus_difficulty_aware\ntraining: {iteration: 10}\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key training.iteration; did you mean 'iterations'\?"):
        load_config(path)


def test_kwargs_are_compared_by_the_network_they_build():
    """Leaving out a default, or giving it as a tuple or list, builds the same network."""
    package = load_package("hippocampus_difficulty_aware")
    shipped = package.card["architecture"]["kwargs"]
    assert models.resolved_kwargs("difficulty_aware", **shipped) == models.resolved_kwargs(
        "difficulty_aware", base_features=8, depth=4, beta=2.0, coarse_confidence=True)
    assert models.resolved_kwargs("difficulty_aware", **shipped) != models.resolved_kwargs(
        "difficulty_aware", base_features=8, depth=4, beta=1.0, coarse_confidence=True)
    # the README recipe builds the package's network (its coarse confidence network came after the base
    # config's training, so the base's kwargs alone do not), which the fine-tuning engine requires
    recipe = load_config("fine_tune_corrections")
    assert recipe["model"]["architecture"] == package.card.architecture
    assert recipe["model"]["init_from"] == "hippocampus_difficulty_aware"
    assert models.resolved_kwargs("difficulty_aware", **recipe["model"]["kwargs"]) == models.resolved_kwargs(
        "difficulty_aware", **shipped)
    with pytest.raises(TypeError, match="takes no argument"):
        models.resolved_kwargs("unet", featurs=[8])
