"""The training engine on real hippocampus cases: one real step for every registered architecture,
exact resume, early stopping, and the command line with its outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from AttnSegLib import models
from AttnSegLib.package import save_package
from training import train
from training.card import model_card
from training.config import CONFIG_DIR, ConfigError
from training.engine import ResumeError, Trainer
from training.losses import AlternatingLoss
from training.schedules import LearningRateFactor

from training_helpers import small_config, write_small_msd


@pytest.fixture(scope="module")
def small_msd(tmp_path_factory, hippocampus_dir):
    return write_small_msd(tmp_path_factory.mktemp("msd"), hippocampus_dir)


def _config_for(architecture: str, data_root, output, **training) -> dict:
    """The architecture's hippocampus config; an architecture without one trains with the CI config's
    settings, its own default kwargs and a patch its divisor accepts."""
    if (CONFIG_DIR / f"hippocampus_{architecture}.yaml").is_file():
        config = small_config(f"hippocampus_{architecture}", data_root, output, **training)
        config["model"].pop("warm_start", None)  # a second stage's start (run/package) is not here
        return config
    config = small_config("ci", data_root, output, **training)
    divisor = models.build(architecture, in_channels=1, num_classes=3).divisor
    config["model"] = {"architecture": architecture, "kwargs": {}}
    config["patch_size"] = [-(-s // divisor) * divisor for s in config["patch_size"]]
    return config


@pytest.mark.parametrize("architecture", models.names())
def test_one_real_training_step(architecture, small_msd, tmp_path):
    config = _config_for(architecture, small_msd, tmp_path / "run", iterations=1)
    config["batch_size"] = 1
    trainer = Trainer(config, progress=False)
    before = {k: v.clone() for k, v in trainer.network.state_dict().items() if v.is_floating_point()}
    loader = iter(trainer._loader(stop=1))
    parts = trainer.train_step([next(loader) for _ in range(config["training"]["accumulation"])])
    assert trainer.iteration == 1
    assert parts["loss"] > 0 and all(torch.isfinite(torch.tensor(v)) for v in parts.values())
    after = trainer.network.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    weights = {k for k in before if k.endswith("weight") and "norm" not in k}
    assert len(changed & weights) >= 0.9 * len(weights), f"{architecture}: few weights were updated"
    if isinstance(trainer.loss, AlternatingLoss):  # both networks took their step
        assert {"confidence", "segmenter"} <= parts.keys()
        assert any(k.startswith("confidence_net.") for k in changed)
        assert any(k.startswith("segmenter.") for k in changed)


@pytest.mark.parametrize("architecture", ["unet", "difficulty_aware"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(architecture, small_msd, tmp_path):
    """6 iterations straight vs 3 + resume + 3: identical weights, optimiser moments, history
    (with gradient accumulation, augmentation and a validation in the middle)."""
    settings = dict(iterations=6, accumulation=2, validation_interval=3)

    def config(name):
        cfg = _config_for(architecture, small_msd, tmp_path / name, **settings)
        cfg["batch_size"], cfg["patch_size"] = 1, [16, 32, 24]
        return cfg

    straight = Trainer(config("straight"), progress=False)
    straight.fit()
    first = Trainer(config("resumed"), progress=False)
    first.fit(stop_at=4)
    assert first.iteration == 4
    resumed = Trainer(config("resumed"), resume=True, progress=False)
    assert resumed.iteration == 4
    resumed.fit()

    a = load_file(str(tmp_path / "straight" / "checkpoints" / "last.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for opt_a, opt_b in zip(straight.optimizers, resumed.optimizers):
        for state_a, state_b in zip(opt_a.state.values(), opt_b.state.values()):
            assert torch.equal(state_a["exp_avg_sq"], state_b["exp_avg_sq"])
    assert straight.history == resumed.history
    assert [v["iteration"] for v in resumed.history["validation"]] == [3, 6]


def test_early_stopping_stops_when_validation_dice_stalls(small_msd, tmp_path):
    config = small_config("ci", small_msd, tmp_path / "run", iterations=20, validation_interval=2,
                          early_stopping={"patience": 2, "min_delta": 0.0})
    config["optimizer"]["lr"] = 0.0  # nothing learns: every validation ties the first
    trainer = Trainer(config, progress=False)
    best = trainer.fit()
    assert trainer.iteration == 6 and len(trainer.history["validation"]) == 3
    assert best["iteration"] == 2


def test_command_line_run_writes_its_outputs_and_refuses_to_overwrite(small_msd, tmp_path, capsys):
    config = small_config("ci", small_msd, tmp_path / "run", iterations=4, validation_interval=2)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    assert train.main(["--config", str(config_file), "--no-progress", "--stop-at", "2"]) == 0
    run = tmp_path / "run"
    said = capsys.readouterr().out
    assert "stopped at iteration 2 of 4 (--stop-at 2)" in said
    assert f"python -m training.train --output {run} --resume" in said
    assert (run / "split.json").is_file() and (run / "curves.png").stat().st_size > 10_000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["iteration"] == 2 and set(metrics["dice"]) == {"Anterior", "Posterior"}

    assert train.main(["--config", str(config_file), "--no-progress"]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert train.main(["--resume", "--output", str(run), "--no-progress"]) == 0  # the run's own config
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == 4 and len(state["history"]["validation"]) == 2

    with pytest.raises(ResumeError, match="does not exist"):
        Trainer(config, output_dir=tmp_path / "empty", resume=True, progress=False)
    changed = {**config, "patch_size": [16, 16, 16], "optimizer": {**config["optimizer"], "lr": 0.5}}
    with pytest.raises(ResumeError, match=r"config changed in optimizer.lr \(0.003 -> 0.5\); patch_size "
                                          r"\(\[32, 48, 32\] -> \[16, 16, 16\]\); a resumed run may change only"):
        Trainer(changed, resume=True, progress=False)


def test_resume_applies_a_raised_iteration_count_and_records_it(small_msd, tmp_path, capsys):
    config = small_config("ci", small_msd, tmp_path / "run", iterations=2, validation_interval=2)
    Trainer(config, progress=False).fit()
    config_file = tmp_path / "more.yaml"
    config_file.write_text(yaml.safe_dump({**config, "training": {**config["training"], "iterations": 4}}))
    assert train.main(["--config", str(config_file), "--resume", "--no-progress"]) == 0
    assert "resuming with training.iterations changed from 2 to 4" in capsys.readouterr().out
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["iterations"] == 4  # -> the card
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == 4
    assert state["history"]["config_changes"] == [{"iteration": 2, "changes": {"training.iterations": [2, 4]}}]


def test_fine_tuning_starts_from_a_package_and_refuses_one_that_does_not_fit(small_msd, tmp_path):
    """``model.init_from``: a run on corrected cases starts from the shipped weights."""
    config = small_config("ci", small_msd, tmp_path / "run", iterations=2)
    torch.manual_seed(1)
    donor = models.build("unet", in_channels=1, num_classes=3, **config["model"]["kwargs"])
    split = {"train": ["hippocampus_001", "hippocampus_003"], "validation": ["hippocampus_004"]}
    package = save_package(tmp_path / "donor", model_card(config, donor, split), donor.state_dict())
    # the same network with its defaults written out (norm, act) is the same network
    same = {**config["model"], "kwargs": {**config["model"]["kwargs"], "norm": "instance"},
            "init_from": str(package.path)}
    trainer = Trainer({**config, "model": same}, progress=False)
    for key, value in donor.state_dict().items():
        assert torch.equal(trainer.network.state_dict()[key], value), key

    other = {**config, "output_dir": str(tmp_path / "other"),
             "model": {"architecture": "unet", "kwargs": {"features": [4, 8]}, "init_from": str(package.path)}}
    with pytest.raises(ConfigError, match=r"its architecture or model kwargs \(the network they build\) differ"):
        Trainer(other, progress=False)


def test_warm_start_continues_from_a_package_and_records_it(small_msd, tmp_path):
    """``model.warm_start``: a second stage on the same data starts from a package's weights, may change a
    setting without parameters (here MDA-U-Net's assignment temperature), and names its start in the run;
    a package whose parameters do not fit is refused in one line."""
    config = small_config("hippocampus_mda_unet", small_msd, tmp_path / "run", iterations=1)
    torch.manual_seed(2)
    donor = models.build("mda_unet", in_channels=1, num_classes=3, **config["model"]["kwargs"])
    package = save_package(tmp_path / "stage1", model_card(config, donor), donor.state_dict())
    sharper = {**config["model"], "kwargs": {**config["model"]["kwargs"], "assignment_temperature": 0.2},
               "warm_start": str(package.path)}
    trainer = Trainer({**config, "model": sharper}, progress=False)
    for key, value in donor.state_dict().items():
        assert torch.equal(trainer.network.state_dict()[key], value), key
    assert json.loads((tmp_path / "run" / "warm_start.json").read_text()) == {
        "name": package.name, "sha256": package.sha256,
        "budget": {"iterations": 1, "batch_size": config["batch_size"]}}  # the first stage's, from its card
    wider = {**config, "output_dir": str(tmp_path / "wider"),
             "model": {**sharper, "kwargs": {**sharper["kwargs"], "base_features": 4}}}
    with pytest.raises(ConfigError, match=r"model.warm_start .*do not fit this config's network") as err:
        Trainer(wider, progress=False)
    assert "\n" not in str(err.value)
    missing = {**config, "output_dir": str(tmp_path / "missing"),
               "model": {**sharper, "warm_start": str(tmp_path / "stage1_not_exported")}}
    with pytest.raises(ConfigError, match=r"model.warm_start cannot be used: .*train and export the stage"):
        Trainer(missing, progress=False)


@pytest.mark.parametrize("settings, expected", [
    ({"name": "poly", "power": 1.0}, [1.0, 0.5, 0.0]),
    ({"name": "cosine"}, [1.0, 0.5, 0.0]),
    ({"name": "step", "step_epochs": 2, "gamma": 0.5}, [1.0, 0.5, 0.25]),
    ({"name": "warm_restarts", "period_epochs": 4, "step_epochs": 2, "gamma": 0.1}, [1.0, 0.1, 1.0]),
])
def test_schedules_at_start_middle_and_end(settings, expected):
    """100 iterations, 25 per epoch: iterations 0, 50 (epoch 2) and 100 (epoch 4)."""
    factor = LearningRateFactor(total=100, iterations_per_epoch=25, **settings)
    assert [round(factor(t), 6) for t in (0, 50, 100)] == pytest.approx(expected)


def test_torchrun_two_processes_train_with_distributed_data_parallel(small_msd, tmp_path):
    """Two CPU processes (gloo) under torchrun: one run folder, rank 0 validates and writes, every
    rank's RNG state is kept for resuming."""
    config = small_config("ci", small_msd, tmp_path / "run", iterations=2, validation_interval=2)
    config["patch_size"] = [16, 32, 24]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "training.train", "--config", str(config_file), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("iteration 2: validation mean Dice") == 1  # rank 0 validates, once
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == 2 and len(state["rng"]) == 2
