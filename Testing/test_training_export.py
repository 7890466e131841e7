"""Export and evaluation: a trained run becomes a package that predicts exactly as its checkpoint, with
a complete card, and ``training.evaluate`` scores it per case."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from safetensors.torch import load_file

from AttnSegLib import models
from AttnSegLib.image import read_image
from AttnSegLib.inference import Predictor
from AttnSegLib.package import PackageError, load_package
from training import evaluate
from training.card import model_card
from training.engine import Trainer
from training.export import export_run

from training_helpers import small_config, write_small_msd


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, hippocampus_dir):
    """A tiny U-Net trained for 6 iterations on 5 real hippocampus cases (1 held out)."""
    root = tmp_path_factory.mktemp("export")
    data = write_small_msd(root / "msd", hippocampus_dir)
    config = small_config("ci", data, root / "run", iterations=6, validation_interval=3)
    trainer = Trainer(config, progress=False)
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def package(trained_run, tmp_path_factory):
    return export_run(trained_run.output, tmp_path_factory.mktemp("pkg") / "tiny_unet", progress=False)


def test_package_predicts_exactly_as_the_checkpoint(trained_run, package):
    config = trained_run.config
    network = models.build("unet", in_channels=1, num_classes=3, **config["model"]["kwargs"])
    network.load_state_dict(load_file(str(trained_run.output / "checkpoints" / "best.safetensors")))
    card = model_card(config, network)
    card["inference"]["temperature"] = package.card["inference"]["temperature"]  # fitted at export
    from_checkpoint = Predictor(network, card=card, device="cpu")
    from_package = Predictor(load_package(package.path), device="cpu")
    case = trained_run.split["validation"][0]
    image = read_image(trained_run.output.parent / "msd" / "imagesTr" / f"{case}.nii.gz")
    a, b = from_checkpoint.predict([image]), from_package.predict([image])
    np.testing.assert_array_equal(a.labels.array, b.labels.array)
    np.testing.assert_array_equal(a.probabilities.array, b.probabilities.array)


def test_card_holds_what_the_product_and_a_reader_need(trained_run, package):
    card = package.card
    assert card["name"] == "ci_unet" and card["architecture"] == {"name": "unet", "kwargs": {"features": [8, 16, 32]}}
    assert [c["name"] for c in card["classes"]] == ["background", "Anterior", "Posterior"]
    assert card["modalities"] == [{"name": "T1", "contrast": "T1-weighted MRI", "normalization": "zscore"}]
    assert card["spacing_xyz_mm"] == [1.0, 1.0, 1.0] and card["orientation"] == "RAS"
    assert card["patch_size_dhw"] == [32, 48, 32]
    assert card["training"]["licence"] == "CC-BY-SA 4.0"
    assert "Simpson et al." in card["training"]["attribution"]
    assert "Vanderbilt University Medical Center" in card["training"]["attribution"]
    assert card["training"]["cases_train"] == 4 and card["training"]["validation_cases"] == trained_run.split["validation"]
    metrics = card["metrics"]
    assert metrics["split"] == "validation" and metrics["cases"] == 1
    assert set(metrics["dice"]) == {"Anterior", "Posterior"} and 0 <= metrics["mean_dice"] <= 1
    assert metrics["training_validation"]["iteration"] == trained_run.best["iteration"]
    # a U-Net's only doubt map is its uncertainty: measured, and chosen to rank the review
    assert set(metrics["error_detection_auroc"]) == {"uncertainty"} and card["inference"]["review_map"] == "uncertainty"
    # the temperature fitted on the validation cases, with the calibration error it gave
    assert 0.05 <= card["inference"]["temperature"] <= 20
    assert set(metrics["calibration"]) == {"before", "after"} and all(0 <= v <= 1 for v in metrics["calibration"].values())
    assert len(package.sha256) == 64 and (package.path / "weights.safetensors").is_file()


def test_card_maps_come_from_the_network(trained_run, tmp_path):
    """An architecture with maps (DAM-AL: spatial attention) lists them with their meaning."""
    network = models.build("dam_al", in_channels=1, num_classes=3, features=[8, 16, 32, 64])
    card = model_card({**trained_run.config, "model": {"architecture": "dam_al",
                                                       "kwargs": {"features": [8, 16, 32, 64]}}}, network)
    assert card["maps"] == {name: {"meaning": text} for name, text in network.map_descriptions().items()}
    assert "spatial_attention.level1" in card["maps"]


def test_export_without_best_weights_says_what_to_do(trained_run, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "split.json"):
        (tmp_path / "run" / name).write_text((trained_run.output / name).read_text())
    with pytest.raises(PackageError, match="best.safetensors does not exist; train the run first"):
        export_run(tmp_path / "run", tmp_path / "pkg", progress=False)


def test_evaluate_writes_per_case_metrics_a_summary_and_a_box_plot(trained_run, package, tmp_path, capsys):
    data = trained_run.output.parent / "msd"
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(package.path), "--data", str(data), "--split", "all",
                          "--output", str(out), "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 5 * 2 and {r["class"] for r in rows} == {"Anterior", "Posterior"}
    assert all(0 <= float(r["dice"]) <= 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 5 and summary["sha256"] == package.sha256
    assert summary["dice"]["Anterior"] == pytest.approx(np.mean([float(r["dice"]) for r in rows if r["class"] == "Anterior"]), abs=1e-3)
    assert (out / "boxplot.png").stat().st_size > 10_000
    assert "5 all cases, mean foreground Dice" in capsys.readouterr().out
    assert "error_detection_auroc" not in summary  # only measured with --maps

    # the validation split alone reproduces the card's measured metrics
    assert evaluate.main(["--model", str(package.path), "--data", str(data), "--output", str(tmp_path / "val"),
                          "--device", "cpu"]) == 0
    validation = json.loads((tmp_path / "val" / "summary.json").read_text())
    assert validation["cases"] == 1 and validation["dice"] == package.card["metrics"]["dice"]


def test_evaluate_with_maps_measures_how_well_the_doubt_maps_find_the_errors(trained_run, package, tmp_path, capsys):
    data = trained_run.output.parent / "msd"
    assert evaluate.main(["--model", str(package.path), "--data", str(data), "--split", "all", "--maps",
                          "--output", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    auroc = summary["error_detection_auroc"]
    assert set(auroc) == {"uncertainty"} and 0 <= auroc["uncertainty"] <= 1  # 6 iterations: any ranking
    review = summary["review"]
    assert set(review["maps"]) == {"uncertainty", "boundary distance"} and 0 <= review["ece_foreground"] <= 1
    assert review["maps"]["uncertainty"]["auroc"] == auroc["uncertainty"]
    for plot in ("reliability.png", "review_effort.png"):
        assert (tmp_path / "eval" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "uncertainty: AUROC" in out and "boundary distance: AUROC" in out and "foreground ECE" in out
