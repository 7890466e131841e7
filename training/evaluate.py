"""Evaluate a model package on labelled cases: per-case Dice, ASD and HD95 per class (CSV), a
summary (JSON) and a box plot (PNG); with ``--maps``, also how well each doubt map (uncertainty, and
the model's difficulty where it has one) finds the wrongly labelled voxels (AUROC per case).

    python -m training.evaluate --model Resources/Models/hippocampus_unet \\
        --data ../shared/data/hippocampus --split validation --output runs/eval_hippocampus

Each case runs through the product path (``Predictor.predict`` on the original images: preprocessing,
sliding window, back to the input grid) and is scored on the input grid in mm with
``AttnSegLib.metrics.evaluate_labels``. ``--data`` is a dataset folder (layout from ``--layout`` or
detected) or a training config; the dataset description (modalities, classes, label values) otherwise
comes from the config stored in the package's card. ``--split validation`` scores the cases the card
lists as held out, ``train`` the others, ``all`` every case; ``--cases`` keeps only the named ones.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from AttnSegLib.image import ImageError, read_image
from AttnSegLib.inference import Predictor
from AttnSegLib.maps import DOUBT_MAPS
from AttnSegLib.metrics import error_detection_auroc, evaluate_labels
from AttnSegLib.package import PackageError, load_package

from .config import ConfigError, load_config, resolve_path
from .data import (CaseFiles, DatasetError, check_label_values, detect_layout, find_cases, label_lookup,
                   label_on_grid)
from .plots import box_plot

SPLITS = ("validation", "train", "all")
METRICS = {"dice": "Dice", "asd_mm": "ASD (mm)", "hd95_mm": "HD95 (mm)"}


def dataset_description(card: dict, data_arg: str | None, layout: str | None) -> tuple[dict, Path]:
    """(data section, root): from a config file, or the card's training config with another root."""
    if data_arg and data_arg.endswith((".yaml", ".yml")):
        data = load_config(data_arg)["data"]
        return data, resolve_path(data["root"])
    stored = (card.get("training") or {}).get("config")
    if stored is None:
        raise ConfigError("the package's card holds no training config; pass --data CONFIG.yaml to describe the dataset")
    data = dict(stored["data"])
    root = resolve_path(data_arg) if data_arg else resolve_path(data["root"])
    data["layout"] = layout or (detect_layout(root) if data_arg else data["layout"])
    return data, root


def select_split(cases: list[CaseFiles], card: dict, split: str) -> list[CaseFiles]:
    if split == "all":
        return cases
    held_out = set((card.get("training") or {}).get("validation_cases") or [])
    if not held_out:
        raise ConfigError("the package's card lists no validation cases; use --split all")
    chosen = [c for c in cases if (c.name in held_out) == (split == "validation")]
    if not chosen:
        raise DatasetError(f"none of the {split} cases of this package is in the dataset")
    return chosen


def select_cases(cases: list[CaseFiles], wanted: list[str], split: str) -> list[CaseFiles]:
    """The cases named in ``wanted`` (case names, or a single text file of names, one a line), in the
    order given; a name that is not among ``cases`` is an error that names it."""
    if len(wanted) == 1 and Path(wanted[0]).is_file():
        wanted = [line.strip() for line in Path(wanted[0]).read_text().splitlines() if line.strip()]
    by_name = {c.name: c for c in cases}
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise DatasetError(f"--cases: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                           f"{'is' if len(missing) == 1 else 'are'} not among the {len(cases)} {split} cases; "
                           "check the names or use --split all")
    return [by_name[name] for name in dict.fromkeys(wanted)]


@dataclass
class Evaluation:
    """``scores``: case -> class name -> {"dice", "asd_mm", "hd95_mm", "reference_ml", "prediction_ml"};
    ``error_detection``: case -> doubt map -> AUROC of finding the wrong voxels (empty without maps)."""
    scores: dict[str, dict[str, dict]] = field(default_factory=dict)
    error_detection: dict[str, dict[str, float | None]] = field(default_factory=dict)


def evaluate_case(predictor: Predictor, case: CaseFiles,
                  data: dict) -> tuple[dict[str, dict], dict[str, float | None]]:
    """Predict one case from its files and score it on its own grid: (class name -> metrics,
    doubt map -> error-detection AUROC; measured only when the predictor makes its maps)."""
    result = predictor.predict([read_image(p) for p in case.images])
    label = read_image(case.label)
    reference = label.with_array(check_label_values(label.array, label_lookup(data["classes"]), str(case.label)))
    reference = label_on_grid(reference, result.labels.geometry)
    names = {c["value"]: c["name"] for c in data["classes"] if c["value"] != 0}
    scores = evaluate_labels(result.labels, reference, result.labels.geometry.spacing, names)
    if not predictor.with_maps:
        return scores, {}
    errors = result.labels.array != reference
    detection = {name: error_detection_auroc(result.maps[name], errors) for name in DOUBT_MAPS if name in result.maps}
    return scores, detection


def evaluate_cases(predictor: Predictor, cases: list[CaseFiles], data: dict, progress: bool = True) -> Evaluation:
    evaluation = Evaluation()
    for case in tqdm(cases, desc="evaluate", disable=not progress):
        evaluation.scores[case.name], detection = evaluate_case(predictor, case, data)
        if predictor.with_maps:
            evaluation.error_detection[case.name] = detection
    return evaluation


def summarize_error_detection(error_detection: dict[str, dict[str, float | None]]) -> dict[str, float]:
    """Doubt map -> mean AUROC over the cases that have errors (higher finds the errors better)."""
    names = {name for per_map in error_detection.values() for name in per_map}
    means = {}
    for name in sorted(names):
        values = [v[name] for v in error_detection.values() if v.get(name) is not None]
        if values:
            means[name] = round(float(np.mean(values)), 4)
    return means


def summarize(per_case: dict[str, dict[str, dict]], split: str) -> dict:
    """Mean (and standard deviation) of each metric per class over the cases, plus the mean
    foreground Dice. Undefined distances (one mask empty) are left out of their means and counted."""
    class_names = list(next(iter(per_case.values())))
    summary: dict = {"split": split, "cases": len(per_case), "space": "input grid, mm"}
    for metric in METRICS:
        summary[metric] = {}
        for name in class_names:
            values = [m[name][metric] for m in per_case.values() if m[name][metric] is not None]
            summary[metric][name] = round(float(np.mean(values)), 4) if values else None
        summary[f"{metric}_std"] = {
            name: round(float(np.std([m[name][metric] for m in per_case.values() if m[name][metric] is not None])), 4)
            for name in class_names if summary[metric][name] is not None}
    summary["mean_dice"] = round(float(np.mean([summary["dice"][n] for n in class_names])), 4)
    summary["undefined_distances"] = sum(m[n]["asd_mm"] is None for m in per_case.values() for n in class_names)
    return summary


def write_csv(per_case: dict[str, dict[str, dict]], path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "class", *METRICS, "reference_ml", "prediction_ml"])
        for case, classes in per_case.items():
            for name, m in classes.items():
                writer.writerow([case, name, *("" if m[k] is None else f"{m[k]:.4f}" for k in METRICS),
                                 m["reference_ml"], m["prediction_ml"]])
    return path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model package (folder, .zip or installed name)")
    parser.add_argument("--data", help="dataset folder or training config (default: the card's dataset)")
    parser.add_argument("--layout", choices=("msd", "iseg", "brats", "folder", "corrected"),
                        help="layout of --data (default: detected)")
    parser.add_argument("--split", choices=SPLITS, default="validation")
    parser.add_argument("--cases", nargs="+", metavar="CASE",
                        help="only these cases (names, or one text file listing them one a line), within --split")
    parser.add_argument("--output", required=True, help="folder for metrics.csv, summary.json, boxplot.png")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    parser.add_argument("--maps", action="store_true",
                        help="also measure how well each doubt map finds the wrong voxels (AUROC)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        package = load_package(args.model)
        data, root = dataset_description(package.card, args.data, args.layout)
        cases = select_split(find_cases(data, root), package.card, args.split)
        if args.cases:
            cases = select_cases(cases, args.cases, args.split)
        predictor = Predictor(package, device=args.device, tta=args.tta, with_maps=args.maps)
        evaluation = evaluate_cases(predictor, cases, data)
    except (PackageError, ConfigError, DatasetError, ImageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = resolve_path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    per_case = evaluation.scores
    summary = summarize(per_case, args.split)
    if evaluation.error_detection:
        summary["error_detection_auroc"] = summarize_error_detection(evaluation.error_detection)
    write_csv(per_case, out / "metrics.csv")
    (out / "summary.json").write_text(json.dumps({"model": package.name, "sha256": package.sha256, **summary},
                                                 indent=1) + "\n")
    box_plot(per_case, METRICS, out / "boxplot.png", f"{package.name}: {args.split} ({len(per_case)} cases)")
    print(f"{len(per_case)} {args.split} cases, mean foreground Dice {summary['mean_dice']:.4f}")
    for name in summary["dice"]:
        print(f"  {name}: Dice {summary['dice'][name]:.4f}, ASD {summary['asd_mm'][name]} mm, "
              f"HD95 {summary['hd95_mm'][name]} mm")
    for name, auroc in summary.get("error_detection_auroc", {}).items():
        print(f"  {name} finds the wrong voxels with AUROC {auroc:.4f}")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
