"""Dice, ASD and HD95 of every shipped hippocampus package (``--dataset``) on its held-out validation
cases, and how well its doubt maps find its errors, next to the U-Net
baseline trained with the same budget and the published nnU-Net figure.

    python benchmarks/accuracy.py            # writes benchmarks/results/accuracy.{md,json}
    python benchmarks/accuracy.py --model hippocampus_rsanet --cases 4 --output /tmp/accuracy.json   # a quick check

Cases: the validation cases every package's card lists (``training.validation_cases``, the seeded
split ``training/`` writes to ``runs/<name>/split.json``), intersected over the packages so that
every row is scored on the same cases, none of which any of them trained on. Each case runs through
the product path (``training.evaluate``: ``Predictor.predict`` on the original image, scored on its
own grid in mm with ``AttnSegLib.metrics``), with its maps.

Review map: how well each doubt map of a package (``uncertainty``, and ``difficulty`` where the
network has one) finds the voxels its segmentation got wrong, as the mean over the cases of the
AUROC of the map's values against the wrong-voxel mask (``training.evaluate``). The map the card
names as ``inference.review_map`` is the one the product ranks doubtful regions by; the card's own
figure (``metrics.error_detection_auroc``, measured at export) is quoted beside the one measured here.
For the review map the table adds what a reviewer needs (``training.evaluate.summarize_review``): its
average precision (AUPRC) beside that of the boundary-distance baseline (doubt that is only the
nearness to the predicted boundary), the share of the wrong voxels inside its most doubtful 5 % of
the crop, and the expected calibration error of the foreground probabilities; ``accuracy_reliability.png``
and ``accuracy_review_effort.png`` beside the results plot them for every package.

Baselines: the shipped U-Net package (``unet`` architecture; same data, split, patch and seed as the
attention networks, and each card's ``training.config`` gives the iterations and batch, the table's
budget column) is the row every other is
compared with: mean difference of per-case foreground Dice, paired over the same cases, with a
Wilcoxon signed-rank p-value. The nnU-Net row is nnU-Net's published Dice on
MSD Task04 (Isensee et al., Nature Methods 2021; the Decathlon's test cases): a different protocol
(other cases, a far larger training budget, an ensemble), quoted for scale, not measured here.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BASELINE_ARCHITECTURE = "unet"
NNUNET = {"name": "nnU-Net (published)", "dice": {"Anterior": 0.90, "Posterior": 0.89},
          "source": "Isensee et al., nnU-Net, Nature Methods 2021: Medical Segmentation Decathlon "
                    "Task04 Hippocampus, challenge test set"}
METRICS = ("dice", "asd_mm", "hd95_mm")


def trained_on(package) -> str | None:
    """The dataset folder a package was trained on (its card's ``training.config.data.root``, last part)."""
    config = (package.card.get("training") or {}).get("config") or {}
    root = (config.get("data") or {}).get("root")
    return Path(root).name if root else None


def shipped_packages(dataset: str) -> list:
    """The shipped packages trained on ``dataset`` (a folder of the data root); the others are named and left out."""
    from AttnSegLib.package import PackageError, available_packages, load_package

    packages = []
    for path in available_packages():
        try:
            package = load_package(path)
        except PackageError as err:
            print(f"accuracy: skipping unusable package {path}: {err}", file=sys.stderr)
            continue
        if package.members:
            print(f"accuracy: leaving out {package.name}: an ensemble of {', '.join(package.card.members)} "
                  "(its card holds what python -m training.ensemble measured)", file=sys.stderr)
            continue
        if trained_on(package) != dataset:
            print(f"accuracy: leaving out {package.name}: trained on {trained_on(package)}, not {dataset}",
                  file=sys.stderr)
            continue
        packages.append(package)
    if not packages:
        raise SystemExit(f"no shipped model package trained on {dataset} to evaluate "
                         "(train and export one first, or pass --dataset)")
    return packages


def common_validation_cases(packages) -> list[str]:
    """Case names every package held out; an error when a package lists none."""
    held_out = None
    for package in packages:
        names = set(common.validation_case_names(package))
        held_out = names if held_out is None else held_out & names
    if not held_out:
        raise SystemExit("the packages share no validation case; train them with the same seed and split")
    return sorted(held_out)


def evaluate(package, case_names: list[str], device: str):
    """``training.evaluate.Evaluation`` of the named cases: ``.scores`` (case -> class -> {"dice",
    "asd_mm", "hd95_mm", ...}) and ``.error_detection`` (case -> doubt map -> AUROC)."""
    from AttnSegLib.inference import Predictor
    from training.data import find_cases
    from training.evaluate import dataset_description, evaluate_cases

    stored_root = Path(package.card["training"]["config"]["data"]["root"])
    data, root = dataset_description(package.card, str(common.data_root() / stored_root.name), None)
    cases = [c for c in find_cases(data, root) if c.name in set(case_names)]
    predictor = Predictor(package, device=device, with_maps=True)
    return evaluate_cases(predictor, cases, data, progress=False)


def foreground_dice(per_case: dict[str, dict[str, dict]]) -> dict[str, float]:
    return {case: float(np.mean([m["dice"] for m in classes.values()])) for case, classes in per_case.items()}


def paired_difference(per_case: dict, baseline: dict) -> dict:
    """Mean per-case foreground-Dice difference against the baseline and its Wilcoxon p-value."""
    from scipy.stats import wilcoxon

    ours, theirs = foreground_dice(per_case), foreground_dice(baseline)
    diff = np.array([ours[c] - theirs[c] for c in sorted(ours)])
    p = float(wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
    return {"mean_dice_difference": round(float(diff.mean()), 4), "wilcoxon_p": float(f"{p:.3g}"),
            "cases_better": int((diff > 0).sum()), "cases_worse": int((diff < 0).sum())}


def review_maps(package, measured: dict[str, float]) -> dict:
    """The card's review map, and each doubt map's error-detection AUROC: measured here, and as the card states."""
    card = package.card
    return {"review_map": (card.get("inference") or {}).get("review_map"), "measured": measured,
            "card": (card.get("metrics") or {}).get("error_detection_auroc") or {}}


def budget_cell(budget: dict) -> str:
    """``iterations x batch``, a warm-started package's first stage before it (``1250 x 2 + 1500 x 2``)."""
    first = budget.get("first_stage")
    stage = f"{budget['iterations']} x {budget['batch_size']}"
    return f"{first['iterations']} x {first['batch_size']} + {stage}" if first else stage


def row(package, summary: dict, error_detection: dict[str, float], review: dict) -> dict:
    config = package.card["training"]["config"]
    network = package.build_network()
    return {
        "model": package.name, "architecture": package.card["architecture"]["name"],
        "parameters": sum(p.numel() for p in network.parameters()),
        "budget": {"iterations": config["training"]["iterations"], "batch_size": config["batch_size"],
                   "patch_size": config["patch_size"],
                   "first_stage": (package.card["training"].get("warm_start") or {}).get("budget")},
        **{metric: summary[metric] for metric in METRICS},
        **{f"{metric}_std": summary[f"{metric}_std"] for metric in METRICS},
        "mean_dice": summary["mean_dice"], "undefined_distances": summary["undefined_distances"],
        "error_detection_auroc": review_maps(package, error_detection),
        "review": review,
    }


def review_cell(detection: dict) -> str:
    """Each doubt map's AUROC measured here (the card's in brackets); the card's review map in bold."""
    cells = []
    for name, auroc in detection["measured"].items():
        stated = detection["card"].get(name)
        text = f"{name} {auroc:.3f}" + ("" if stated is None else f" ({stated:.3f})")
        cells.append(f"**{text}**" if name == detection["review_map"] else text)
    return ", ".join(cells) or "n/a"


def reviewer_cell(r: dict) -> str:
    """The card's review map's AUPRC (the boundary baseline's in brackets), errors found within 5 %, ECE."""
    from training.evaluate import BOUNDARY_BASELINE, REVIEW_BUDGET

    review = r["review"]
    chosen = review["maps"].get(r["error_detection_auroc"]["review_map"] or "uncertainty")
    baseline = review["maps"].get(BOUNDARY_BASELINE)
    if chosen is None:
        return "n/a | n/a | n/a"
    return (f"{chosen['average_precision']:.3f} ({baseline['average_precision']:.3f}) | "
            f"{100 * chosen[f'found_within_{REVIEW_BUDGET:g}']:.0f} % | {review['ece_foreground']:.4f}")


def plot_review(report: dict, output: Path) -> list[Path]:
    """The reliability diagram of every package and the effort curve of each one's review map (and of
    the first package's boundary baseline), beside ``output``."""
    from training.evaluate import BOUNDARY_BASELINE, ERRORS_TO_FIND, REVIEW_BUDGET
    from training.plots import effort_plot, reliability_diagram

    rows, title = report["rows"], f"{report['cases']} validation cases"
    bins = {r["model"]: np.array(r["review"]["calibration_bins"]) for r in rows}
    curves = {}
    for r in rows:
        name = r["error_detection_auroc"]["review_map"] or "uncertainty"
        if name in r["review"]["maps"]:
            curves[f"{r['model']}: {name}"] = r["review"]["maps"][name]["effort_curve"]
    curves[f"{BOUNDARY_BASELINE} ({rows[0]['model']})"] = rows[0]["review"]["maps"][BOUNDARY_BASELINE]["effort_curve"]
    stem = output.with_suffix("")
    return [reliability_diagram(bins, stem.with_name(f"{stem.name}_reliability.png"), title),
            effort_plot(rows[0]["review"]["effort_fractions"], curves,
                        stem.with_name(f"{stem.name}_review_effort.png"), title, REVIEW_BUDGET, ERRORS_TO_FIND)]


def markdown(report: dict) -> str:
    classes = report["classes"]
    head = ("| model | parameters | budget (iterations x batch) | " + " | ".join(f"Dice {c}" for c in classes)
            + " | mean Dice | " + " | ".join(f"ASD {c} (mm)" for c in classes) + " | "
            + " | ".join(f"HD95 {c} (mm)" for c in classes) + " | vs U-Net (paired) | errors found, AUROC (card) "
            "| review map AUPRC (boundary baseline) | errors in top 5 % | ECE |")
    lines = [
        f"{report['cases']} validation cases of MSD Task04 Hippocampus held out by every package "
        f"(mean ± standard deviation over cases), measured by `python benchmarks/accuracy.py`. "
        "Review map: the card's review map's average precision for the wrong voxels, the boundary-distance "
        "baseline's in brackets; errors in top 5 %: share of the wrong voxels inside its most doubtful 5 % "
        "of the crop; ECE: expected calibration error of the foreground probabilities (15 bins, pooled). "
        "vs U-Net: mean per-case difference of foreground Dice, Wilcoxon signed-rank p. Errors found: "
        "mean per-case AUROC of each doubt map against the wrongly labelled voxels; the review map "
        "the card names in bold, the card's own figure in brackets.",
        "",
        head,
        "|" + "---|" * (9 + 3 * len(classes)),
    ]
    for r in report["rows"]:
        cells = [r["model"], f"{r['parameters']:,}", budget_cell(r["budget"])]
        cells += [f"{r['dice'][c]:.3f} ± {r['dice_std'][c]:.3f}" for c in classes]
        cells += [f"**{r['mean_dice']:.3f}**"]
        for metric in ("asd_mm", "hd95_mm"):
            cells += ["n/a" if r[metric][c] is None else f"{r[metric][c]:.2f} ± {r[f'{metric}_std'].get(c, 0):.2f}"
                      for c in classes]
        versus = r.get("versus_baseline")
        cells += ["baseline" if versus is None else
                  f"{versus['mean_dice_difference']:+.3f} (p = {versus['wilcoxon_p']:.2g}; "
                  f"{versus['cases_better']} better, {versus['cases_worse']} worse)"]
        cells += [review_cell(r["error_detection_auroc"]), reviewer_cell(r)]
        lines.append("| " + " | ".join(cells) + " |")
    nnunet = report["nnunet"]
    lines.append("| " + " | ".join([nnunet["name"], "", "challenge test set"]
                                   + [f"{nnunet['dice'][c]:.2f}" for c in classes]
                                   + [f"{np.mean(list(nnunet['dice'].values())):.3f}"]
                                   + ["not published"] * (2 * len(classes)) + ["(different protocol)", "", "", "", ""])
                 + " |")
    lines += ["", f"nnU-Net: {nnunet['source']}; quoted, not measured here."]
    if report["not_shipped"]:
        lines.append(f"Not shipped yet, so not in the table: {', '.join(report['not_shipped'])}.")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="hippocampus",
                        help="score the packages trained on this dataset folder of the data root (default hippocampus)")
    parser.add_argument("--model", help="only this package or architecture (the U-Net baseline is always scored)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", type=int,
                        help="only the first N shared validation cases (a quick check; default all)")
    parser.add_argument("--output", type=Path, default=common.RESULTS_DIR / "accuracy.json",
                        help="results JSON; the Markdown table is written beside it (.md)")
    parser.add_argument("--json", action="store_true", help="print the report as the last line")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    started = time.perf_counter()
    packages = shipped_packages(args.dataset)
    baseline = next((p for p in packages if p.card["architecture"]["name"] == BASELINE_ARCHITECTURE), None)
    chosen = [p for p in packages if args.model in (None, p.name, p.card["architecture"]["name"]) or p is baseline]
    chosen.sort(key=lambda p: (p is not baseline, p.name))
    case_names = common_validation_cases(chosen)[: args.cases]
    from training.evaluate import summarize, summarize_error_detection, summarize_review

    per_model, rows = {}, []
    for package in chosen:
        evaluation = evaluate(package, case_names, args.device)
        per_model[package.name] = evaluation.scores
        rows.append(row(package, summarize(evaluation.scores, "validation"),
                        summarize_error_detection(evaluation.error_detection), summarize_review(evaluation)))
        rows[-1]["case_mean_dice"] = {case: round(d, 4) for case, d in foreground_dice(evaluation.scores).items()}
        print(f"{package.name}: mean foreground Dice {rows[-1]['mean_dice']:.4f}", file=sys.stderr)
    if baseline is not None:
        for r in rows:
            if r["model"] != baseline.name:
                r["versus_baseline"] = paired_difference(per_model[r["model"]], per_model[baseline.name])
    shipped_architectures = {p.card["architecture"]["name"] for p in packages}
    configs = sorted(common.CONFIG_DIR.glob("hippocampus_*.yaml"))
    report = {
        "benchmark": "accuracy", "cases": len(case_names), "case_names": case_names,
        "classes": [c["name"] for c in chosen[0].classes[1:]],
        "baseline": baseline.name if baseline else None, "rows": rows, "nnunet": NNUNET,
        "not_shipped": [c.stem for c in configs if common.stand_in_card(c.stem)["architecture"]["name"]
                        not in shipped_architectures],
        "machine": common.machine(args.threads), "elapsed_s": round(time.perf_counter() - started, 1),
    }
    common.write_report(args.output, report, markdown(report))
    plot_review(report, args.output)
    print(markdown(report))
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
