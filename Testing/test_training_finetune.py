"""Fine-tuning the shipped hippocampus U-Net on real corrected cases (saved as the module saves them):
replay of its training cases, the changed voxels sampled, validation from iteration 0 on the parent's
reference cases, lineage in the card, export refusing a model worse than its parent, a broken case
skipped unless strict, and files readable as the user's umask says."""
from __future__ import annotations

import json
import os
import shutil
import stat
import warnings

import numpy as np
import pytest

from AttnSegLib import cli
from AttnSegLib.package import load_package
from training import finetune, train
from training.card import model_card
from training.config import ConfigError, load_config
from training.data import Case, DatasetError, SkippedCaseWarning, find_cases
from training.engine import Trainer
from training.export import WorseThanParentError, export_run
from training.patches import PatchDataset

from training_helpers import write_corrected_case

PARENT = "hippocampus_unet"
CORRECTED = ("hippocampus_001", "hippocampus_008", "hippocampus_011")  # validation cases of the parent


@pytest.fixture(scope="module")
def parent():
    return load_package(PARENT)


@pytest.fixture(scope="module")
def corrections(tmp_path_factory, hippocampus_dir, parent):
    """Three real corrected cases and one broken case folder (its image is not an image)."""
    root = tmp_path_factory.mktemp("corrections")
    for name in CORRECTED:
        write_corrected_case(root, hippocampus_dir, name, parent)
    broken = root / "hippocampus_broken"
    broken.mkdir()
    shutil.copy(root / CORRECTED[0] / "label.nii.gz", broken / "label.nii.gz")
    (broken / "image_0000.nii.gz").write_bytes(b"not a NIfTI file")
    return root


def recipe(corrections, output, **fine_tuning) -> dict:
    """The README's recipe (fine_tune_corrections.yaml) for the U-Net package, sized for a test: the
    U-Net's kwargs are left out (its defaults build the shipped network), 2 iterations."""
    return load_config("fine_tune_corrections", {
        "data": {"root": str(corrections), "validation_fraction": 0.34},
        "model": {"architecture": "unet", "kwargs": {}, "init_from": PARENT},
        "fine_tuning": {"replay_cases": 3, "reference_cases": 2, "freeze": [], **fine_tuning},
        "batch_size": 2,
        "training": {"iterations": 2, "validation_interval": 1},
        "output_dir": str(output),
    })


@pytest.fixture(scope="module")
def run(corrections, tmp_path_factory):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(recipe(corrections, tmp_path_factory.mktemp("runs") / "run"), device="cpu", progress=False)
    trainer.fit()
    trainer.skipped = [str(w.message) for w in caught if issubclass(w.category, SkippedCaseWarning)]
    return trainer


def test_a_broken_corrected_case_is_skipped_with_a_warning_or_refused_when_strict(run, corrections, tmp_path):
    assert len(run.skipped) == 1 and "hippocampus_broken" in run.skipped[0] and "--strict" in run.skipped[0]
    assert sorted(run.split["train"] + run.split["validation"]) == list(CORRECTED)
    config = recipe(corrections, tmp_path / "strict")
    with pytest.raises(DatasetError, match="hippocampus_broken"):
        Trainer(config, device="cpu", progress=False, strict=True)
    config_file = tmp_path / "strict.yaml"
    config_file.write_text(json.dumps(config))
    assert train.main(["--config", str(config_file), "--strict", "--no-progress"]) == 2


def test_parent_weights_replay_and_reference_cases(run, parent):
    assert run.parent.sha256 == parent.sha256
    held_out = set(parent.card["training"]["validation_cases"])
    assert len(run.replay_cases) == 3 and not {c.name for c in run.replay_cases} & held_out
    assert len(run.reference_cases) == 2 and {c.name for c in run.reference_cases} <= held_out - set(CORRECTED)
    assert all(c.changed is not None and c.changed.shape == c.label.shape for c in run.train_cases)
    # iteration 0 validates the parent's own weights, on the corrections and on the reference
    first = run.history["validation"][0]
    assert first["iteration"] == 0 and first["reference"]["cases"] == 2
    assert first["reference"]["mean_dice"] > 0.8  # the shipped U-Net on two of its validation cases
    assert [v["iteration"] for v in run.history["validation"]] == [0, 1, 2]


def test_patches_mix_corrections_and_replay_and_centre_on_changed_voxels(run):
    """changed_voxel_ratio 1: every patch of a corrected case holds a changed voxel; case weights
    0 / 1 draw only from the replay cases."""
    case = run.train_cases[0]
    marked = Case(case.name, np.arange(case.label.size, dtype=np.float32).reshape(1, *case.label.shape),
                  case.label, case.changed)
    dataset = PatchDataset([marked], run.config["patch_size"], 3, run.config["sampling"], {}, seed=0,
                           changed_ratio=1.0)
    changed_values = set(np.flatnonzero(case.changed).tolist())
    for index in range(8):
        patch = dataset[index]["image"].numpy().astype(np.int64).ravel()
        assert changed_values & set(patch.tolist()), index
    only_replay = PatchDataset(run.train_cases + run.replay_cases, run.config["patch_size"], 3,
                               run.config["sampling"], {}, seed=0,
                               case_weights=[0.0] * len(run.train_cases) + [1.0] * len(run.replay_cases))
    assert only_replay.probabilities[:len(run.train_cases)].sum() == 0


def test_lineage_in_the_exported_card(run, parent, tmp_path, capsys):
    package = export_run(run.output, tmp_path / "tuned", device="cpu", progress=False)
    card = package.card
    lineage = card["training"]["lineage"]
    assert lineage["parent"] == {"name": PARENT, "sha256": parent.sha256}
    assert sorted(c["case"] for c in lineage["corrections"]) == list(CORRECTED)
    assert all(c["model_sha256"] == parent.sha256 and c["changed_voxels"] >= 0 for c in lineage["corrections"])
    assert lineage["data_mix"]["replay_cases"] == 3 and lineage["data_mix"]["replay_fraction"] == 0.5
    assert card["description"].startswith(f"Fine-tuned from {PARENT}")
    assert "corrected cases" in card["training"]["dataset"]
    reference = card["metrics"]["reference"]
    assert reference["cases"] == 2 and reference["parent"] == PARENT
    assert reference["difference"] == pytest.approx(reference["mean_dice"] - reference["parent_mean_dice"], abs=1e-4)
    # `attnseg info --model PATH` describes it, lineage included
    assert cli.main(["info", "--model", str(package.path)]) == 0
    said = capsys.readouterr().out
    assert package.sha256 in said and f"fine-tuned from {PARENT} (sha256 {parent.sha256}) on 3 corrected cases" in said
    # readable by others as the user's umask says (safetensors alone writes 0600)
    mask = os.umask(0)
    os.umask(mask)
    for path in (package.path / "weights.safetensors", run.checkpoints / "best.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_export_refuses_a_model_worse_than_its_parent_unless_forced(corrections, tmp_path, capsys):
    """A destructive step (SGD at lr 2) ruins the network; its last weights are refused, saying by how much."""
    config = recipe(corrections, tmp_path / "bad", reference_tolerance=0.005)
    config["optimizer"] = {"name": "sgd", "lr": 2.0, "momentum": 0.9}
    config["schedule"] = {"name": "constant"}
    Trainer(config, device="cpu", progress=False).fit()
    with pytest.raises(WorseThanParentError, match=r"worse than its parent hippocampus_unet on the 2 reference "
                                                    r"cases by 0\.\d{4} mean Dice"):
        export_run(tmp_path / "bad", tmp_path / "refused", weights="last", device="cpu", progress=False)
    assert not (tmp_path / "refused" / "model.json").exists()
    from training import export

    assert export.main(["--run", str(tmp_path / "bad"), "--output", str(tmp_path / "refused"), "--weights", "last",
                        "--device", "cpu"]) == 2
    assert "pass --force" in capsys.readouterr().err
    forced = export_run(tmp_path / "bad", tmp_path / "forced", weights="last", device="cpu", progress=False, force=True)
    assert forced.card["metrics"]["reference"]["difference"] < -0.005
    # the best checkpoint kept the reference: it is the parent's (iteration 0) and exports
    best = export_run(tmp_path / "bad", tmp_path / "best", device="cpu", progress=False)
    assert best.card["metrics"]["reference"]["difference"] >= -0.005


def test_freezing_keeps_the_named_parameters_and_a_typo_is_refused(corrections, tmp_path, parent):
    trainer = Trainer(recipe(corrections, tmp_path / "frozen", freeze=["encoder"]), device="cpu", progress=False)
    frozen = {k for k, p in trainer.network.named_parameters() if not p.requires_grad}
    assert frozen and all(k.startswith("encoder") for k in frozen)
    trainer.fit()
    for key in frozen:
        assert np.array_equal(trainer.network.state_dict()[key].numpy(), parent.weights[key].numpy()), key
    with pytest.raises(ConfigError, match="fine_tuning.freeze: no parameter starts with 'encodr'"):
        Trainer(recipe(corrections, tmp_path / "typo", freeze=["encodr"]), device="cpu", progress=False)


def test_corrected_cases_without_a_label_are_skipped_when_found(corrections, tmp_path):
    root = tmp_path / "corr"
    shutil.copytree(corrections / CORRECTED[0], root / CORRECTED[0])
    (root / "unlabelled").mkdir()
    shutil.copy(corrections / CORRECTED[0] / "image_0000.nii.gz", root / "unlabelled")
    data = load_config("fine_tune_corrections", {"data": {"root": str(root)}})["data"]
    with pytest.warns(SkippedCaseWarning, match="unlabelled: no label.nii.gz"):
        assert [c.name for c in find_cases(data, root)] == [CORRECTED[0]]
    with pytest.raises(DatasetError, match="unlabelled: no label.nii.gz"):
        find_cases(data, root, strict=True)


def test_a_frozen_retrained_confidence_network_keeps_the_parents_map_meanings():
    """The README recipe on the default package freezes its confidence network, which training.error_map
    retrained on where the segmenter is wrong: the fine-tuned card says what that network's maps mean
    (the parent's text and units, and how it was trained), not the paper's generic text; once the
    confidence network has changed, the generic text is the honest one."""
    default = load_package("hippocampus_difficulty_aware")
    network = default.build_network()
    weights = {name: value.clone() for name, value in default.weights.items()}
    weights[next(n for n in weights if n.startswith("segmenter."))] += 0.1  # fine-tuning moved S
    card = model_card(load_config("fine_tune_corrections"), network)
    assert "looks like a manual one" in card["maps"]["confidence"]["meaning"]  # the network's own text
    assert finetune.keep_parent_maps(card, default, weights)
    for name, spec in default.card["maps"].items():
        assert (card["maps"][name]["meaning"], card["maps"][name]["unit"]) == (spec["meaning"], spec["unit"])
    assert card["training"]["confidence_network"] == default.card["training"]["confidence_network"]
    weights[next(n for n in weights if n.startswith("confidence_net."))] += 0.1
    generic = model_card(load_config("fine_tune_corrections"), network)
    assert not finetune.keep_parent_maps(generic, default, weights)
    assert "looks like a manual one" in generic["maps"]["confidence"]["meaning"]
    assert "confidence_network" not in generic["training"]
