"""Interactive correction with the standard simulated user: Dice after each click, for every refinement
method of :mod:`AttnSegLib.refine`, on the validation hippocampus cases of the default model.

    python benchmarks/interactive.py            # all validation cases; writes benchmarks/results/interactive.*
    python benchmarks/interactive.py --quick --json   # 8 cases, no files; the last line is one JSON object

The user: each click at the deepest interior point (maximum of the distance transform, mm) of the
largest connected error component of the current labels, with the expert class there (``background``
for a false region); up to ``--clicks`` clicks (default 10, so that clicks-to-0.90 is capped at 10). The
first result is the default segmentation package's (``Predictor.predict``), on the original image grid.

Reported per method: mean Dice per class and over classes after k = 0..5 clicks, the area under that
mean curve (trapezoid over k = 0..5, divided by 5), the clicks needed to reach Dice 0.90 per class
(mean over cases; 10 when never reached), seconds per click (median and 95th percentile, model loaded,
``Refiner.refine`` wall time on one thread) on the hippocampus crops and on a whole-head volume (the
MNI152 T1, 197x233x189, segmented by the same model, localised to both hippocampi; 5 clicks in the
brain, refined in place as a session holding the result does), and the voxels whose
probabilities changed farther than 15 mm from every click so far (checked here, not taken from the
refiner). The machine was shared: times are upper bounds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHOWN_CLICKS = 5
TARGET_DICE = 0.90
PNG = common.RESULTS_DIR / "interactive.png"


def dice_per_class(labels: np.ndarray, truth: np.ndarray, classes: int) -> list[float]:
    out = []
    for k in range(1, classes):
        a, b = labels == k, truth == k
        total = a.sum() + b.sum()
        out.append(1.0 if total == 0 else float(2 * (a & b).sum() / total))
    return out


def far_changes(before: np.ndarray, after: np.ndarray, clicks_voxels: list[np.ndarray], spacing) -> int:
    """Voxels whose probabilities differ, farther than RADIUS_MM from every click (mm)."""
    from AttnSegLib.refine import RADIUS_MM

    changed = np.argwhere(np.any(before != after, axis=0))
    if len(changed) == 0:
        return 0
    nearest = np.min([np.sqrt((((changed - v) * spacing) ** 2).sum(axis=1)) for v in clicks_voxels], axis=0)
    return int((nearest > RADIUS_MM + 1e-3).sum())


def run_case(refiner, image, truth, probabilities, clicks: int) -> dict:
    """One case, one method: Dice per class after each click, seconds per click, far changes."""
    from AttnSegLib.maps import normalized_entropy
    from AttnSegLib.refine import click_voxel, simulated_click, voxel_click

    geometry = image.geometry
    spacing = np.asarray(geometry.spacing)[::-1]
    stack = image.array[None].astype(np.float32)
    classes = probabilities.shape[0]
    labels = probabilities.argmax(axis=0).astype(np.uint8)
    curve, seconds, far, history = [dice_per_class(labels, truth, classes)], [], 0, []
    uncertainty = normalized_entropy(probabilities)
    for _ in range(clicks):
        found = simulated_click(labels, truth, spacing)
        if found is None:
            curve.append(curve[-1])
            continue
        click = voxel_click(found[0], found[1], geometry)
        refined = refiner.refine(stack, probabilities, geometry, [click], history, uncertainty, labels)
        history.append(click)
        seconds.append(refined.seconds)
        far += far_changes(probabilities, refined.probabilities, [click_voxel(c, geometry) for c in history], spacing)
        probabilities, labels, uncertainty = refined.probabilities, refined.labels, refined.uncertainty
        curve.append(dice_per_class(labels, truth, classes))
    return {"curve": curve, "seconds": seconds, "far_changes": far}


def whole_head_result(package, volume: Path):
    """(image, result) of a whole-head T1 segmented by ``package`` (overlap 0: only the input matters here)."""
    from AttnSegLib.image import read_image
    from AttnSegLib.inference import Predictor

    image = read_image(volume)
    return image, Predictor(package, device="cpu", with_maps=False, overlap=0.0).predict([image])


def whole_head_seconds(refiner, image, result, clicks: int = 5) -> list[float]:
    """Seconds per click on the whole-head result: ``clicks`` positive clicks at random bright voxels."""
    from AttnSegLib.refine import class_parts, voxel_click

    parts = None if refiner.learned is None else class_parts(result.classes, refiner.learned.class_names)
    rng = np.random.default_rng(0)
    brain = np.argwhere(image.array > np.percentile(image.array, 75))
    stack = image.array[None].astype(np.float32)
    # the session's own copies, refined in place as an application holding the result would
    probabilities, history, seconds = result.probabilities.array.astype(np.float32), [], []
    uncertainty, labels = result.maps["uncertainty"].array.astype(np.float32), result.labels.array.astype(np.uint8)
    for index in brain[rng.choice(len(brain), clicks, replace=False)]:
        click = voxel_click(index, 1 + len(history) % (probabilities.shape[0] - 1), image.geometry)
        refined = refiner.refine(stack, probabilities, image.geometry, [click], history, uncertainty, labels, parts,
                                 in_place=True)
        history.append(click)
        seconds.append(refined.seconds)
        probabilities, uncertainty, labels = refined.probabilities, refined.uncertainty, refined.labels
    return seconds


def summarise(runs: list[dict], class_names: list[str], clicks: int) -> dict:
    curves = np.asarray([r["curve"] for r in runs])  # (cases, clicks + 1, classes)
    mean_curve = curves.mean(axis=0)
    shown = mean_curve[: SHOWN_CLICKS + 1]
    mean_over_classes = shown.mean(axis=1)
    reached = []
    for case in curves:
        row = []
        for k in range(case.shape[1]):
            hits = np.flatnonzero(case[:, k] >= TARGET_DICE)
            row.append(int(hits[0]) if len(hits) else clicks)
        reached.append(row)
    seconds = [s for r in runs for s in r["seconds"]]
    return {
        "dice_by_clicks": {name: [round(float(v), 4) for v in shown[:, k]] for k, name in enumerate(class_names)}
        | {"mean": [round(float(v), 4) for v in mean_over_classes]},
        "auc": round(float(np.trapezoid(mean_over_classes) / SHOWN_CLICKS), 4),
        "clicks_to_90": {name: round(float(np.mean([r[k] for r in reached])), 2) for k, name in enumerate(class_names)},
        "seconds_per_click_median": round(common.median(seconds), 4) if seconds else None,
        "seconds_per_click_p95": round(float(np.percentile(seconds, 95)), 4) if seconds else None,
        "far_changed_voxels": int(sum(r["far_changes"] for r in runs)),
        "clicks_made": len(seconds),
    }


def plot(methods: dict, automatic: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4), dpi=120)
    for name, summary in methods.items():
        curve = summary["dice_by_clicks"]["mean"]
        ax.plot(range(len(curve)), curve, marker="o", label=f"{name} (AUC {summary['auc']:.3f})")
    ax.axhline(automatic + 0.03, color="grey", linestyle=":", label="target after 3 clicks (automatic + 0.03)")
    ax.axhline(0.94, color="grey", linestyle="--", label="target after 5 clicks (0.94)")
    ax.set_xlabel("clicks")
    ax.set_ylabel("mean Dice (anterior, posterior)")
    ax.set_title("Hippocampus validation cases: Dice by clicks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def table(report: dict) -> str:
    lines = ["| method | Dice after 0 / 1 / 2 / 3 / 4 / 5 clicks (mean) | AUC | clicks to 0.90 (ant., post.) "
             "| s/click median (p95) crop | s/click median whole head | voxels changed > 15 mm |",
             "|---|---|---|---|---|---|---|"]
    for name, m in report["methods"].items():
        curve = " / ".join(f"{v:.3f}" for v in m["dice_by_clicks"]["mean"])
        c90 = ", ".join(f"{v:.1f}" for v in m["clicks_to_90"].values())
        head = m.get("whole_head_seconds_median")
        lines.append(f"| {name}{' (default)' if name == report['default_method'] else ''} | {curve} | {m['auc']:.3f} "
                     f"| {c90} | {m['seconds_per_click_median']:.3f} ({m['seconds_per_click_p95']:.3f}) "
                     f"| {'n/a' if head is None else f'{head:.3f}'} | {m['far_changed_voxels']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 cases, no whole-head timing, no files written")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--cases", type=int, help="validation cases (default all; --quick 8)")
    parser.add_argument("--clicks", type=int, default=10, help="clicks per case (default 10)")
    parser.add_argument("--methods", nargs="+", help="refinement methods (default all)")
    parser.add_argument("--model", help="segmentation package (default: the shipped default)")
    parser.add_argument("--output", type=Path, help="results JSON (default benchmarks/results/interactive.json)")
    args = parser.parse_args(argv)
    if args.clicks < SHOWN_CLICKS:
        parser.error(f"--clicks must be at least {SHOWN_CLICKS} (the curve shows 0..{SHOWN_CLICKS})")
    common.set_threads(1)

    from AttnSegLib.image import read_image
    from AttnSegLib.inference import Predictor
    from AttnSegLib.package import default_package_name, load_package
    from AttnSegLib.refine import DEFAULT_METHOD, METHODS, Refiner, find_refinement_package

    root = common.data_root()
    package = load_package(args.model or default_package_name())
    class_names = [c["name"] for c in package.classes]
    cases = package.card["training"]["validation_cases"]
    cases = cases[: args.cases or (8 if args.quick else len(cases))]
    refinement = find_refinement_package(package.card)
    methods = [m for m in (args.methods or METHODS) if m != "learned" or refinement is not None]
    refiners = {m: Refiner(m, refinement) for m in methods}
    predictor = Predictor(package, device="cpu", with_maps=False)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for name in cases:
        image = read_image(root / "hippocampus" / "imagesTr" / f"{name}.nii.gz")
        truth = read_image(root / "hippocampus" / "labelsTr" / f"{name}.nii.gz").array.astype(np.int64)
        probabilities = predictor.predict([image]).probabilities.array
        for method, refiner in refiners.items():
            runs[method].append(run_case(refiner, image, truth, probabilities, args.clicks))
        print(f"{name}: " + ", ".join(f"{m} {np.mean(r[-1]['curve'][min(SHOWN_CLICKS, args.clicks)]):.3f}"
                                      for m, r in runs.items()), file=sys.stderr, flush=True)
    summaries = {m: summarise(r, class_names[1:], args.clicks) for m, r in runs.items()}
    volume = root / common.MNI_T1
    if not args.quick and volume.is_file():
        head, head_result = whole_head_result(package, volume)
        for method, refiner in refiners.items():
            seconds = whole_head_seconds(refiner, head, head_result)
            summaries[method]["whole_head_seconds_median"] = round(common.median(seconds), 4)
            summaries[method]["whole_head_seconds_p95"] = round(float(np.percentile(seconds, 95)), 4)
    default = DEFAULT_METHOD if DEFAULT_METHOD in summaries else methods[0]
    automatic = summaries[default]["dice_by_clicks"]["mean"][0]
    report = {
        "benchmark": "interactive", "model": package.name, "refinement_package": refinement.name if refinement else None,
        "cases": len(cases), "clicks_per_case": args.clicks, "default_method": default,
        "machine": common.machine(1), "methods": summaries,
        "dice_by_clicks": summaries[default]["dice_by_clicks"], "clicks_to_90": summaries[default]["clicks_to_90"],
        "seconds_per_click_median": summaries[default]["seconds_per_click_median"],
        "targets": {"dice_after_3_clicks": round(automatic + 0.03, 4), "dice_after_5_clicks": 0.94,
                    "seconds_per_click_crop": 0.3, "seconds_per_click_whole_head": 1.0},
    }
    if not args.quick:
        path = common.write_report(args.output or common.RESULTS_DIR / "interactive.json", report, table(report))
        plot(summaries, automatic, path.with_suffix(".png"))
    print(table(report), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
