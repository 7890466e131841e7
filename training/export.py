"""Export a training run as a model package (``model.json`` + ``weights.safetensors``).

    python -m training.export --run runs/hippocampus_unet --output Resources/Models/hippocampus_unet

The card carries the architecture and kwargs, modalities, classes, spacing, orientation, patch size, the
network's maps with their meaning, the data attribution and the split sizes, and the validation
metrics measured on the exported network through the product path (``Predictor.predict`` on the
original validation images, Dice / ASD / HD95 on the input grid; see :mod:`training.evaluate`), with
how well each doubt map finds the wrongly labelled voxels (AUROC); the best of them becomes the card's
``inference.review_map``, the map the review ranks doubtful regions by. ``inference.training_field_of_view_mm``
is the median extent of the training images along the model's axes (an input much larger is localised
or refused), and ``inference.localisation`` comes from the config's ``data.localisation`` (e.g.
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
from AttnSegLib.inference import Predictor
from AttnSegLib.package import ModelPackage, PackageError, save_package

from .card import model_card
from .config import ConfigError, load_config, resolve_path
from .data import DatasetError, find_cases
from .evaluate import evaluate_cases, summarize, summarize_error_detection

WEIGHTS = {"best": "best.safetensors", "last": "last.safetensors"}


def export_run(run: str | Path, output: str | Path, weights: str = "best", name: str | None = None,
               device: str = "auto", progress: bool = True) -> ModelPackage:
    """Package the ``weights`` (best | last) of ``run`` into ``output``, with measured validation metrics."""
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
    if training_cases:
        card["inference"]["training_field_of_view_mm"] = training_field_of_view_mm(training_cases, data.get("orientation"))
    if data.get("localisation"):
        card["inference"]["localisation"] = dict(data["localisation"])
    cases = [c for c in every_case if c.name in held_out]
    evaluation = evaluate_cases(Predictor(network, card=card, device=device), cases, data, progress)
    detection = summarize_error_detection(evaluation.error_detection)
    card["metrics"] = {**summarize(evaluation.scores, "validation"), "error_detection_auroc": detection,
                       "weights": weights}
    if detection:  # review the regions of the map that found the validation errors best
        card["inference"]["review_map"] = max(detection, key=detection.get)
    metrics_file = run / "metrics.json"
    if metrics_file.is_file():
        card["metrics"]["training_validation"] = json.loads(metrics_file.read_text())
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
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        package = export_run(args.run, args.output, args.weights, args.name, args.device)
    except (PackageError, ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = package.card["metrics"]
    size = sum(p.stat().st_size for p in Path(package.path).iterdir()) / 1e6
    print(f"wrote {package.path} ({size:.1f} MB, sha256 {package.sha256[:12]}...): validation mean Dice "
          f"{metrics['mean_dice']:.4f} on {metrics['cases']} cases "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics["dice"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
