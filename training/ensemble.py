"""Write an ensemble package: a card naming member packages, whose calibrated probabilities the
product averages, with their ``disagreement`` map (:mod:`AttnSegLib.models.ensemble`).

    python -m training.ensemble --name hippocampus_ensemble --output Resources/Models/hippocampus_ensemble \\
        --members hippocampus_difficulty_aware hippocampus_unet hippocampus_mda_unet

The package is a folder holding ``model.json`` alone (``AttnSegLib.package`` loads the members by name
and refuses the card when one is missing, changed since, or segments other classes or another input).
The card takes the members' common facts from the first member (classes, modalities, spacing,
orientation, patch, window overlap and batch, field of view, localisation, the training intensity
profile, the dataset), the test-time flip axes every member allows, and as its held-out cases those
held out by every member. On those cases, through the product path: a temperature fitted on the
averaged probabilities (:mod:`training.calibrate`; the members keep their own), then Dice / ASD / HD95,
and per doubt map the AUROC and the average precision (AUPRC) of finding the wrong voxels beside the
boundary-distance baseline, the review effort and the ECE (:mod:`training.evaluate`). The card's
``inference.review_map`` is the doubt map of the highest average precision (AUROC barely tells maps
apart here: the boundary distance alone scores 0.977).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from AttnSegLib.card import ENSEMBLE, SCHEMA_VERSION, ModelCard
from AttnSegLib.inference import Predictor
from AttnSegLib.package import CARD_FILE, ModelPackage, PackageError, ensemble_sha256, load_package

from .calibrate import fit_on_cases
from .config import ConfigError, resolve_path
from .data import DatasetError, find_cases
from .evaluate import dataset_description, evaluate_cases, summarize
from .map_display import apply_review, apply_to_card

SHARED_KEYS = ("modalities", "classes", "spacing_xyz_mm", "orientation", "crop_to_nonzero", "patch_size_dhw",
               "input_statistics")
SHARED_INFERENCE = ("overlap", "batch_size", "training_field_of_view_mm", "localisation")
SHARED_TRAINING = ("dataset", "licence", "attribution", "cases_train")  # cases_train: those input_statistics counts


def ensemble_card(name: str, members: list[ModelPackage]) -> dict:
    """The ensemble's card (JSON) before calibration and measurement: see the module docstring."""
    first = members[0].card.to_dict()
    held_out = set.intersection(*(set(m.card.held_out_case_names) for m in members))
    axes = [a for a in first["inference"].get("tta_flip_axes", [])
            if all(a in m.card.inference.tta_flip_axes for m in members)]
    names = [m.name for m in members]
    validation_cases = [c for c in members[0].card.held_out_case_names if c in held_out]
    card = {
        "schema_version": SCHEMA_VERSION, "name": name,
        "description": f"Average of the calibrated probabilities of {', '.join(names)}, with a map of where they "
                       f"disagree; the task and input of {names[0]}: {first.get('description', '')}",
        "architecture": {"name": ENSEMBLE, "kwargs": {"members": names}},
        **{key: first[key] for key in SHARED_KEYS if key in first},
        "inference": {**{key: first["inference"][key] for key in SHARED_INFERENCE if key in first["inference"]},
                      "tta_flip_axes": axes, "temperature": 1.0},
        "maps": {"disagreement": {"display_range": [0.0, 1.0]}},
        "training": {**{key: first["training"][key] for key in SHARED_TRAINING if key in first["training"]},
                     "cases_validation": len(validation_cases), "config": {"data": first["training"]["config"]["data"]},
                     "validation_cases": validation_cases},
        "weights_sha256": ensemble_sha256(members),
    }
    return card


def measure(card: dict, network, cases, data: dict, device: str) -> dict:
    """``card`` calibrated and measured on ``cases`` (its temperature, metrics, review map and map texts set)."""
    started = time.perf_counter()
    temperature, calibration = fit_on_cases(network, card, cases, data, device)
    card["inference"]["temperature"] = round(temperature, 4)
    evaluation = evaluate_cases(Predictor(network, card=card, device=device), cases, data)
    card["metrics"] = {
        **summarize(evaluation.scores, "validation"),
        "calibration": {name: calibration[name]["ece_foreground"] for name in ("before", "after")},
        "seconds": round(time.perf_counter() - started, 1),
    }
    apply_to_card(card, network, evaluation)
    apply_review(card, evaluation)
    return card


def write_ensemble(name: str, output, member_names: list[str], device: str = "auto",
                   data_arg: str | None = None) -> ModelPackage:
    """Load the members, write, calibrate and measure the ensemble card into ``output``; reload it to check."""
    members = [load_package(member, member=True) for member in member_names]
    out = resolve_path(output)
    out.mkdir(parents=True, exist_ok=True)
    card = ensemble_card(name, members)
    draft = out / CARD_FILE
    draft.write_text(json.dumps(card, indent=2) + "\n")
    package = load_package(out)  # the loader's checks: every member fits the card
    data, root = dataset_description(package.card, data_arg, None)
    held_out = set(package.card.held_out_case_names)
    cases = [c for c in find_cases(data, root) if c.name in held_out]
    if not cases:
        raise DatasetError(f"none of the {len(held_out)} cases every member holds out is in {root}")
    card = measure(card, package.build_network(), cases, data, device)
    ModelCard.parse(card, str(out))
    draft.write_text(json.dumps(card, indent=2) + "\n")
    return load_package(out)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.ensemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="the ensemble package's name")
    parser.add_argument("--output", required=True, help="folder to write its model.json to")
    parser.add_argument("--members", nargs="+", required=True, metavar="PACKAGE",
                        help="member package names (two or more, installed: see `attnseg info`)")
    parser.add_argument("--data", help="dataset folder or training config (default: the members' dataset)")
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        package = write_ensemble(args.name, args.output, args.members, args.device, args.data)
    except (PackageError, ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics, inference = package.card.to_dict()["metrics"], package.card.inference
    print(json.dumps({"package": str(package.path), "temperature": inference.temperature,
                      "review_map": inference.review_map, "mean_dice": metrics["mean_dice"],
                      "average_precision": metrics["error_detection_average_precision"],
                      "auroc": metrics["error_detection_auroc"], "ece_foreground": metrics["ece_foreground"],
                      "seconds": metrics["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
