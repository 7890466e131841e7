"""Evaluate a model package on labelled cases: per-case Dice, ASD and HD95 per class (CSV), a
summary (JSON) and a box plot (PNG); with ``--maps``, also what a reviewer needs of the doubt maps
(uncertainty, and the model's difficulty where it has one) and the probabilities:

* per map, how well it finds the wrongly labelled voxels: AUROC and average precision (AUPRC), beside
  the ``boundary distance`` baseline, a map that is only the nearness to the predicted boundary;
* the review effort curve: the share of the wrong voxels inside the most doubtful voxels covering up
  to 20 % of the volume (``review_effort.png``), and the share found within 5 %;
* the expected calibration error of the foreground probabilities, and its reliability diagram
  (``reliability.png``);
* per model map (each channel of a multi-channel one), how much it says (``AttnSegLib.map_information``):
  its entropy relative to a flat map, its variation around its uniform level, the share of its mass inside
  the target (its own class for a class channel) and how it differs between right and wrong voxels.

Per-case figures are averaged over the cases with errors; the calibration bins are pooled.

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

from AttnSegLib.card import ModelCard
from AttnSegLib.image import ImageError, read_image
from AttnSegLib.inference import Predictor
from AttnSegLib.map_information import map_information, mean_figures
from AttnSegLib.maps import DOUBT_MAPS, volume_name
from AttnSegLib.metrics import (boundary_distance_doubt, calibration_bins, error_detection_auroc,
                                error_detection_average_precision, evaluate_labels, expected_calibration_error,
                                review_effort_curve, volume_to_find)
from AttnSegLib.package import PackageError, load_package

from .config import ConfigError, load_config, resolve_path
from .data import (LAYOUTS, CaseFiles, DatasetError, check_label_values, detect_layout, find_cases, label_lookup,
                   label_on_grid)
from .plots import box_plot, effort_plot, reliability_diagram

SPLITS = ("validation", "train", "all")
METRICS = {"dice": "Dice", "asd_mm": "ASD (mm)", "hd95_mm": "HD95 (mm)"}
BOUNDARY_BASELINE = "boundary distance"  # the trivial doubt map every map is measured against
EFFORT_FRACTIONS = np.round(np.arange(0, 0.2001, 0.0025), 4)  # reviewed share of the volume, 0 to 20 %
REVIEW_BUDGET, ERRORS_TO_FIND = 0.05, 0.8  # the target: 80 % of the errors within 5 % of the volume
CALIBRATION_BINS = 15


def dataset_description(card: ModelCard, data_arg: str | None, layout: str | None) -> tuple[dict, Path]:
    """(data section, root): from a config file, or the card's training config with another root."""
    if data_arg and data_arg.endswith((".yaml", ".yml")):
        data = load_config(data_arg)["data"]
        return data, resolve_path(data["root"])
    stored = card.training_config
    if stored is None:
        raise ConfigError("the package's card holds no training config; pass --data CONFIG.yaml to describe the dataset")
    data = dict(stored["data"])
    root = resolve_path(data_arg) if data_arg else resolve_path(data["root"])
    data["layout"] = layout or (detect_layout(root) if data_arg else data["layout"])
    return data, root


def select_split(cases: list[CaseFiles], card: ModelCard, split: str) -> list[CaseFiles]:
    if split == "all":
        return cases
    held_out = set(card.held_out_case_names)
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
    ``error_detection``: case -> doubt map -> AUROC of finding the wrong voxels; ``review``: case ->
    :func:`review_case`'s figures; ``calibration``: (3, CALIBRATION_BINS) foreground calibration bins
    pooled over the cases (``AttnSegLib.metrics.calibration_bins``). All but ``scores`` empty without maps."""
    scores: dict[str, dict[str, dict]] = field(default_factory=dict)
    error_detection: dict[str, dict[str, float | None]] = field(default_factory=dict)
    review: dict[str, dict] = field(default_factory=dict)
    calibration: np.ndarray = field(default_factory=lambda: np.zeros((3, CALIBRATION_BINS)))


def review_case(result, reference: np.ndarray) -> dict:
    """How each doubt map of a prediction (``Predictor.predict``'s result) and the boundary baseline
    find the wrong voxels of ``reference`` (D, H, W) labels on the same grid: {"wrong_fraction": share
    of wrong voxels, "maps": map -> {"auroc", "average_precision", "effort": share of the errors
    found at each of EFFORT_FRACTIONS}} (the figures None when the case has no error)."""
    errors = result.labels.array != reference
    doubt = {name: result.maps[name].array for name in DOUBT_MAPS if name in result.maps}
    doubt[BOUNDARY_BASELINE] = boundary_distance_doubt(result.labels.array, result.labels.geometry.spacing)
    maps = {}
    for name, values in doubt.items():
        effort = review_effort_curve(values, errors, EFFORT_FRACTIONS)
        maps[name] = {"auroc": error_detection_auroc(values, errors),
                      "average_precision": error_detection_average_precision(values, errors),
                      "effort": None if effort is None else effort.tolist()}
    return {"wrong_fraction": float(errors.mean()), "maps": maps}


def evaluate_case(predictor: Predictor, case: CaseFiles,
                  data: dict) -> tuple[dict[str, dict], dict[str, dict], np.ndarray | None]:
    """Predict one case from its files and score it on its own grid: (class name -> metrics,
    :func:`review_case`'s figures, calibration bins (3, CALIBRATION_BINS); the last two only when
    the predictor makes its maps, else {} and None)."""
    result = predictor.predict([read_image(p) for p in case.images])
    label = read_image(case.label)
    reference = label.with_array(check_label_values(label.array, label_lookup(data["classes"]), str(case.label)))
    reference = label_on_grid(reference, result.labels.geometry)
    names = {c["value"]: c["name"] for c in data["classes"] if c["value"] != 0}
    scores = evaluate_labels(result.labels, reference, result.labels.geometry.spacing, names)
    if not predictor.with_maps:
        return scores, {}, None
    bins = calibration_bins(result.probabilities.array, reference, CALIBRATION_BINS)
    review = review_case(result, reference)
    review["map_information"] = case_map_information(predictor, result, reference)
    return scores, review, bins


def case_map_information(predictor: Predictor, result, reference: np.ndarray) -> dict[str, dict]:
    """Map volume (``category_attention.anterior``, ``slice_attention.axial``, ...) -> its
    :func:`AttnSegLib.map_information.map_information` figures on this case, for every map of the model
    (``uncertainty`` is the engine's, not the model's, and left out). A channel of a map the network
    lists in ``class_channel_maps`` is measured against its own class, any other map against the foreground."""
    names = predictor.network.map_descriptions()
    class_channel = set(getattr(predictor.network, "class_channel_maps", ()))
    class_value = {volume_name(name): value for value, name in enumerate(predictor.class_names)}
    figures = {}
    for volume, image in result.maps.items():
        key, _, channel = volume.rpartition(".")
        if volume not in names and key not in names:
            continue
        target = class_value.get(channel) if key in class_channel else None
        figures[volume] = map_information(image.array, reference, result.labels.array, target)
    return figures


def summarize_map_information(evaluation: Evaluation) -> dict[str, dict]:
    """Map volume -> the mean of each :func:`map_information` figure over the cases."""
    per_volume: dict[str, list[dict]] = {}
    for case in evaluation.review.values():
        for volume, figures in case.get("map_information", {}).items():
            per_volume.setdefault(volume, []).append(figures)
    return {volume: mean_figures(figures) for volume, figures in per_volume.items()}


def evaluate_cases(predictor: Predictor, cases: list[CaseFiles], data: dict, progress: bool = True) -> Evaluation:
    evaluation = Evaluation()
    for case in tqdm(cases, desc="evaluate", disable=not progress):
        evaluation.scores[case.name], review, bins = evaluate_case(predictor, case, data)
        if predictor.with_maps:
            evaluation.review[case.name] = review
            evaluation.error_detection[case.name] = {name: review["maps"][name]["auroc"] for name in DOUBT_MAPS
                                                     if name in review["maps"]}
            evaluation.calibration += bins
    return evaluation


def summarize_review(evaluation: Evaluation) -> dict:
    """What a reviewer needs, over the cases: per map (the boundary baseline among them) the mean
    AUROC and average precision, the mean effort curve, the share of the errors found within
    REVIEW_BUDGET of the volume and the volume needed to find ERRORS_TO_FIND of them (on the mean
    curve; None beyond 20 %); the mean share of wrong voxels; the pooled foreground ECE and its bins."""
    maps: dict[str, dict] = {}
    for name in dict.fromkeys(n for case in evaluation.review.values() for n in case["maps"]):
        figures = [case["maps"][name] for case in evaluation.review.values()
                   if case["maps"][name]["effort"] is not None]
        if not figures:
            continue
        curve = np.mean([f["effort"] for f in figures], axis=0)
        maps[name] = {
            "auroc": round(float(np.mean([f["auroc"] for f in figures])), 4),
            "average_precision": round(float(np.mean([f["average_precision"] for f in figures])), 4),
            f"found_within_{REVIEW_BUDGET:g}": round(float(np.interp(REVIEW_BUDGET, EFFORT_FRACTIONS, curve)), 4),
            f"volume_to_find_{ERRORS_TO_FIND:g}": volume_to_find(curve, EFFORT_FRACTIONS, ERRORS_TO_FIND),
            "effort_curve": [round(float(v), 4) for v in curve],
        }
    return {
        "maps": maps, "baseline": BOUNDARY_BASELINE, "effort_fractions": EFFORT_FRACTIONS.tolist(),
        "wrong_fraction": round(float(np.mean([c["wrong_fraction"] for c in evaluation.review.values()])), 5),
        "ece_foreground": round(expected_calibration_error(evaluation.calibration), 5),
        "calibration_bins": evaluation.calibration.tolist(),
    }


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


def print_map_information(information: dict[str, dict]) -> None:
    """One line per map volume of :func:`summarize_map_information`'s figures."""
    if information:
        print("  map information (entropy, 1 = flat; ratio to uniform p5-p95; mean in target / outside; "
              "enrichment in target; wrong - right):")
    for volume, f in information.items():
        def show(name, digits=3):
            return "-" if f[name] is None else f"{f[name]:.{digits}f}"
        print(f"    {volume}: {show('entropy_ratio', 4)}; {show('uniform_p05')}-{show('uniform_p95')}; "
              f"{show('mean_in_target')} / {show('mean_outside')}; x{show('enrichment', 2)}; "
              f"{show('wrong_minus_right')}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model package (folder, .zip or installed name)")
    parser.add_argument("--data", help="dataset folder or training config (default: the card's dataset)")
    parser.add_argument("--layout", choices=LAYOUTS,
                        help="layout of --data (default: detected)")
    parser.add_argument("--split", choices=SPLITS, default="validation")
    parser.add_argument("--cases", nargs="+", metavar="CASE",
                        help="only these cases (names, or one text file listing them one a line), within --split")
    parser.add_argument("--output", required=True, help="folder for metrics.csv, summary.json, boxplot.png")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    parser.add_argument("--maps", action="store_true",
                        help="also measure how well each doubt map finds the wrong voxels (AUROC, average "
                             "precision, review effort), the calibration (ECE), with their plots, and how much "
                             "each model map says (AttnSegLib.map_information)")
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
        summary["review"] = summarize_review(evaluation)
        summary["map_information"] = summarize_map_information(evaluation)
        title = f"{package.name}: {args.split} ({len(per_case)} cases)"
        reliability_diagram({package.name: evaluation.calibration}, out / "reliability.png", title)
        effort_plot(EFFORT_FRACTIONS, {name: m["effort_curve"] for name, m in summary["review"]["maps"].items()},
                    out / "review_effort.png", title, REVIEW_BUDGET, ERRORS_TO_FIND)
    write_csv(per_case, out / "metrics.csv")
    (out / "summary.json").write_text(json.dumps({"model": package.name, "sha256": package.sha256, **summary},
                                                 indent=1) + "\n")
    box_plot(per_case, METRICS, out / "boxplot.png", f"{package.name}: {args.split} ({len(per_case)} cases)")
    print(f"{len(per_case)} {args.split} cases, mean foreground Dice {summary['mean_dice']:.4f}")
    for name in summary["dice"]:
        print(f"  {name}: Dice {summary['dice'][name]:.4f}, ASD {summary['asd_mm'][name]} mm, "
              f"HD95 {summary['hd95_mm'][name]} mm")
    review = summary.get("review")
    if review:
        print(f"  {100 * review['wrong_fraction']:.2f} % of the voxels wrong; foreground ECE "
              f"{review['ece_foreground']:.4f}")
        for name, m in review["maps"].items():
            print(f"  {name}: AUROC {m['auroc']:.4f}, average precision {m['average_precision']:.4f}, "
                  f"{100 * m[f'found_within_{REVIEW_BUDGET:g}']:.1f} % of the errors within "
                  f"{100 * REVIEW_BUDGET:g} % of the volume")
    print_map_information(summary.get("map_information") or {})
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
