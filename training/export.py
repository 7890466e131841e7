"""Export a training run as a model package (``model.json`` + ``weights.safetensors``).

    python -m training.export --run runs/hippocampus_unet --output Resources/Models/hippocampus_unet

The card carries the architecture and kwargs, modalities, classes, spacing, orientation, patch size, the
network's maps with their meaning, the data attribution and the split sizes, and the validation
metrics measured on the exported network through the product path (``Predictor.predict`` on the
original validation images, Dice / ASD / HD95 on the input grid; see :mod:`training.evaluate`), the
training cases' intensity statistics inference checks inputs against (:mod:`training.statistics`), with
how well each doubt map finds the wrongly labelled voxels (AUROC, average precision, the share found in
5 % of the volume); the one with the highest average precision becomes the card's ``inference.review_map``,
the map the review ranks doubtful regions by, unless it beats the uncertainty by 0.01 or less
(:func:`training.map_display.choose_review_map`); each map's unit, display range and measured information
(:mod:`training.map_display`).
A fine-tuned run (``model.init_from``) is also measured, with its parent, on the parent's reference
cases (its validation cases not among the corrections): the card gets both (``metrics.reference``), its
lineage (parent name and sha256, the corrections and the model each came from, the data mix) and a
description that says it was fine-tuned; a model worse than its parent there by more than
``fine_tuning.reference_tolerance`` is refused unless ``force`` (``--force``), and the error says by how much.
Before measuring, a temperature that calibrates the probabilities is fitted on the same validation
cases (:mod:`training.calibrate`) and recorded as ``inference.temperature``, so the metrics are those
of the calibrated package. ``inference.training_field_of_view_mm`` is the median extent of the training
images along the model's axes (an input much larger is localised or refused), and ``inference.localisation`` comes from the config's ``data.localisation`` (e.g.
``{method: mni152_affine, targets: [left_hippocampus, right_hippocampus]}``, see ``AttnSegLib.localise``).
The package is written by ``AttnSegLib.package.save_package``, which hashes and reloads it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from safetensors.torch import load_file

from AttnSegLib import models
from AttnSegLib.errors import AttnSegError
from AttnSegLib.inference import Predictor
from AttnSegLib.package import ModelPackage, PackageError, save_package

from . import finetune
from .calibrate import fit_on_cases
from .card import model_card
from .config import load_config, resolve_path
from .data import find_cases
from .engine import WARM_START_FILE
from .evaluate import evaluate_cases, summarize
from .map_display import apply_review, apply_to_card
from .statistics import measure

WEIGHTS = {"best": "best.safetensors", "last": "last.safetensors"}


class WorseThanParentError(PackageError):
    """A fine-tuned model is worse than its parent on the reference cases (export with force)."""


def compare_with_parent(network_predictor: Predictor, parent: ModelPackage, lineage: dict, device: str,
                        progress: bool) -> dict:
    """Both models on the parent's reference cases through the product path: the summary of the
    fine-tuned one with ``parent_mean_dice`` and ``difference`` (fine-tuned minus parent)."""
    data = parent.card.training_config["data"]
    names = set(lineage["reference_cases"])
    cases = [c for c in find_cases(data, resolve_path(data["root"])) if c.name in names]
    ours = summarize(evaluate_cases(network_predictor, cases, data, progress).scores, "reference")
    theirs = summarize(evaluate_cases(Predictor(parent, device=device), cases, data, progress).scores, "reference")
    return {**ours, "parent": parent.name, "parent_mean_dice": theirs["mean_dice"],
            "difference": round(ours["mean_dice"] - theirs["mean_dice"], 4)}


def export_run(run: str | Path, output: str | Path, weights: str = "best", name: str | None = None,
               device: str = "auto", progress: bool = True, force: bool = False) -> ModelPackage:
    """Package the ``weights`` (best | last) of ``run`` into ``output``, with measured validation metrics
    (and for a fine-tuned run the comparison with its parent, refused when worse unless ``force``)."""
    run = resolve_path(run)
    config = load_config(run / "config.yaml")
    if name:
        config["name"] = name
    weights_path = run / "checkpoints" / WEIGHTS[weights]
    if not weights_path.is_file():
        raise PackageError(f"{weights_path} does not exist; train the run first (best weights appear after "
                           "the first validation)")
    split = json.loads((run / "split.json").read_text())
    data = config["data"]
    network = models.build(config["model"]["architecture"], in_channels=len(data["modalities"]),
                           num_classes=len(data["classes"]), **config["model"]["kwargs"])
    state = load_file(str(weights_path))
    network.load_state_dict(state, strict=True)
    card = model_card(config, network, split)

    held_out = set(split["validation"])
    every_case = find_cases(data, resolve_path(data["root"]))
    training_cases = [c for c in every_case if c.name in set(split["train"])]
    card["input_statistics"] = measure(training_cases, data, progress)
    if training_cases:
        card["inference"]["training_field_of_view_mm"] = training_field_of_view_mm(training_cases, data.get("orientation"))
    if data.get("localisation"):
        card["inference"]["localisation"] = dict(data["localisation"])
    cases = [c for c in every_case if c.name in held_out]
    temperature, calibration = fit_on_cases(network, card, cases, data, device, progress)
    card["inference"]["temperature"] = round(temperature, 4)
    evaluation = evaluate_cases(Predictor(network, card=card, device=device), cases, data, progress)
    card["metrics"] = {**summarize(evaluation.scores, "validation"),
                       "calibration": {name: calibration[name]["ece_foreground"] for name in ("before", "after")},
                       "weights": weights}
    lineage = finetune.read_lineage(run)
    parent = finetune.load_parent(config) if lineage is not None else None
    if parent is not None and parent.sha256 != lineage["parent"]["sha256"]:
        raise PackageError(f"model.init_from {parent.name} is now sha256 {parent.sha256[:12]}..., not the package "
                           f"the run started from ({lineage['parent']['sha256'][:12]}...); install that one")
    if parent is not None:
        finetune.keep_parent_maps(card, parent, state)  # before apply_to_card, which keeps a card's meanings
    apply_to_card(card, network, evaluation)
    apply_review(card, evaluation)  # the review ranks the regions of the map that found the errors best
    metrics_file = run / "metrics.json"
    if metrics_file.is_file():
        card["metrics"]["training_validation"] = json.loads(metrics_file.read_text())
    if lineage is not None and lineage["reference_cases"]:
        reference = compare_with_parent(Predictor(network, card=card, device=device), parent, lineage, device,
                                        progress)
        card["metrics"]["reference"] = reference
        tolerance = float(lineage["reference_tolerance"])
        if reference["difference"] < -tolerance and not force:
            raise WorseThanParentError(
                f"{config['name']} is worse than its parent {reference['parent']} on the {reference['cases']} "
                f"reference cases by {-reference['difference']:.4f} mean Dice ({reference['mean_dice']:.4f} "
                f"against {reference['parent_mean_dice']:.4f}; tolerance {tolerance}); fine-tune more gently "
                "(lower lr, more replay) or pass --force to export it anyway")
    warm_start = run / WARM_START_FILE
    if warm_start.is_file():
        card["training"]["warm_start"] = json.loads(warm_start.read_text())
    if lineage is not None:
        card["description"] = finetune.fine_tuned_description(parent, lineage)
        card["training"]["dataset"] = (f"{lineage['data_mix']['corrected_cases']} corrected cases, with "
                                       f"{lineage['data_mix']['replay_cases']} cases of "
                                       f"{lineage['data_mix']['replay_dataset']} replayed")
        card["training"]["lineage"] = lineage
    return save_package(resolve_path(output), card, state)


def training_field_of_view_mm(cases, orientation: str | None) -> list[float]:
    """Median physical extent (mm, rounded to 1 mm) of the cases' first images along the model's axes
    (the axes of ``orientation``, e.g. RAS: x, y, z; without one, each image's own axes), from the headers."""
    extents = []
    reader = sitk.ImageFileReader()
    for case in cases:
        reader.SetFileName(str(case.images[0]))
        reader.ReadImageInformation()
        extent = np.asarray(reader.GetSize(), float) * np.asarray(reader.GetSpacing(), float)
        if orientation:
            own = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reader.GetDirection())
            axis_of = {letter: axis for axis, letter in enumerate(own)}
            opposite = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
            extent = [extent[axis_of.get(letter, axis_of.get(opposite[letter]))] for letter in orientation]
        extents.append(extent)
    return [float(round(v)) for v in np.median(np.asarray(extents, dtype=float), axis=0)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training run folder (holds config.yaml and checkpoints/)")
    parser.add_argument("--output", required=True, help="package folder to write, e.g. Resources/Models/NAME")
    parser.add_argument("--weights", choices=tuple(WEIGHTS), default="best",
                        help="best validation Dice (default) or the last checkpoint")
    parser.add_argument("--name", help="package name (default: the config's name)")
    parser.add_argument("--device", default="auto", help="device for the validation metrics")
    parser.add_argument("--force", action="store_true",
                        help="export a fine-tuned model even when it is worse than its parent on the reference cases")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        package = export_run(args.run, args.output, args.weights, args.name, args.device, force=args.force)
    except AttnSegError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    card, metrics = package.card, package.card.metrics
    size = sum(p.stat().st_size for p in Path(package.path).iterdir()) / 1e6
    print(f"wrote {package.path} ({size:.1f} MB, sha256 {package.sha256[:12]}...): validation mean Dice "
          f"{card.validation_dice:.4f} on {card.validation_cases} cases "
          + ", ".join(f"{k} {v:.4f}" for k, v in card.per_class_dice().items()))
    if "reference" in metrics:
        reference = metrics["reference"]
        print(f"reference ({reference['cases']} validation cases of {reference['parent']}): mean Dice "
              f"{reference['mean_dice']:.4f}, parent {reference['parent_mean_dice']:.4f} "
              f"({reference['difference']:+.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
