"""Dice, ASD and HD95 of every shipped package on its held-out validation cases, next to the U-Net
baseline trained with the same budget and the published nnU-Net figure.

    python benchmarks/accuracy.py            # writes benchmarks/results/accuracy.{md,json}
    python benchmarks/accuracy.py --json

Cases: the validation cases every package's card lists (``training.validation_cases``, the seeded
split ``training/`` writes to ``runs/<name>/split.json``), intersected over the packages so that
every row is scored on the same cases, none of which any of them trained on. Each case runs through
the product path (``training.evaluate``: ``Predictor.predict`` on the original image, scored on its
own grid in mm with ``AttnSegLib.metrics``), maps off.

Baselines: the shipped U-Net package (``unet`` architecture, same data, split, patch, iterations and
batch as the attention networks; its card's ``training.config`` says so) is the row every other is
compared with: mean difference of per-case foreground Dice, paired over the same cases, with a
Wilcoxon signed-rank p-value. The nnU-Net row is the published five-fold cross-validation Dice on
MSD Task04 (Isensee et al., Nature Methods 2021): a different protocol (five folds over the 260 MSD
training cases, a far larger training budget), quoted for scale, not measured here.
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
          "source": "Isensee et al., nnU-Net, Nature Methods 2021: MSD Task04 Hippocampus, five-fold CV"}
METRICS = ("dice", "asd_mm", "hd95_mm")


def shipped_packages() -> list:
    from AttnSegLib.package import PackageError, available_packages, load_package

    packages = []
    for path in available_packages():
        try:
            package = load_package(path)
        except PackageError as err:
            print(f"accuracy: skipping unusable package {path}: {err}", file=sys.stderr)
            continue
        packages.append(package)
    if not packages:
        raise SystemExit("no shipped model package to evaluate (Resources/Models is empty; train and export first)")
    return packages


def common_validation_cases(packages) -> list[str]:
    """Case names every package held out; an error when a package lists none."""
    held_out = None
    for package in packages:
        names = set((package.card.get("training") or {}).get("validation_cases") or [])
        if not names:
            raise SystemExit(f"{package.name}: its card lists no validation cases; "
                             "re-export it with training/export.py")
        held_out = names if held_out is None else held_out & names
    if not held_out:
        raise SystemExit("the packages share no validation case; train them with the same seed and split")
    return sorted(held_out)


def evaluate(package, case_names: list[str], device: str) -> dict[str, dict[str, dict]]:
    """case -> class -> {"dice", "asd_mm", "hd95_mm", ...} on the named cases."""
    from AttnSegLib.inference import Predictor
    from training.data import find_cases
    from training.evaluate import dataset_description, evaluate_cases

    stored_root = Path(package.card["training"]["config"]["data"]["root"])
    data, root = dataset_description(package.card, str(common.data_root() / stored_root.name), None)
    cases = [c for c in find_cases(data, root) if c.name in set(case_names)]
    predictor = Predictor(package, device=device, with_maps=False)
    return evaluate_cases(predictor, cases, data, progress=False).scores


def foreground_dice(per_case: dict[str, dict[str, dict]]) -> dict[str, float]:
    return {case: float(np.mean([m["dice"] for m in classes.values()])) for case, classes in per_case.items()}


def paired_difference(per_case: dict, baseline: dict) -> dict:
    """Mean per-case foreground-Dice difference against the baseline and its Wilcoxon p-value."""
    from scipy.stats import wilcoxon

    ours, theirs = foreground_dice(per_case), foreground_dice(baseline)
    diff = np.array([ours[c] - theirs[c] for c in sorted(ours)])
    p = float(wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
    return {"mean_dice_difference": round(float(diff.mean()), 4), "wilcoxon_p": round(p, 4),
            "cases_better": int((diff > 0).sum()), "cases_worse": int((diff < 0).sum())}


def row(package, summary: dict) -> dict:
    config = package.card["training"]["config"]
    network = package.build_network()
    return {
        "model": package.name, "architecture": package.card["architecture"]["name"],
        "parameters": sum(p.numel() for p in network.parameters()),
        "budget": {"iterations": config["training"]["iterations"], "batch_size": config["batch_size"],
                   "patch_size": config["patch_size"]},
        **{metric: summary[metric] for metric in METRICS},
        **{f"{metric}_std": summary[f"{metric}_std"] for metric in METRICS},
        "mean_dice": summary["mean_dice"], "undefined_distances": summary["undefined_distances"],
    }


def markdown(report: dict) -> str:
    classes = report["classes"]
    head = ("| model | parameters | budget (iterations x batch) | " + " | ".join(f"Dice {c}" for c in classes)
            + " | mean Dice | " + " | ".join(f"ASD {c} (mm)" for c in classes) + " | "
            + " | ".join(f"HD95 {c} (mm)" for c in classes) + " | vs U-Net (paired) |")
    lines = [
        f"{report['cases']} validation cases of MSD Task04 Hippocampus held out by every package "
        f"(mean ± standard deviation over cases), measured by `python benchmarks/accuracy.py`.",
        "",
        head,
        "|" + "---|" * (5 + 3 * len(classes)),
    ]
    for r in report["rows"]:
        cells = [r["model"], f"{r['parameters']:,}", f"{r['budget']['iterations']} x {r['budget']['batch_size']}"]
        cells += [f"{r['dice'][c]:.3f} ± {r['dice_std'][c]:.3f}" for c in classes]
        cells += [f"**{r['mean_dice']:.3f}**"]
        for metric in ("asd_mm", "hd95_mm"):
            cells += ["n/a" if r[metric][c] is None else f"{r[metric][c]:.2f} ± {r[f'{metric}_std'].get(c, 0):.2f}"
                      for c in classes]
        versus = r.get("versus_baseline")
        cells += ["baseline" if versus is None else
                  f"{versus['mean_dice_difference']:+.3f} (p = {versus['wilcoxon_p']:.3f}; "
                  f"{versus['cases_better']} better, {versus['cases_worse']} worse)"]
        lines.append("| " + " | ".join(cells) + " |")
    nnunet = report["nnunet"]
    lines.append("| " + " | ".join([nnunet["name"], "", "five-fold CV"]
                                   + [f"{nnunet['dice'][c]:.2f}" for c in classes]
                                   + [f"{np.mean(list(nnunet['dice'].values())):.3f}"]
                                   + ["not published"] * (2 * len(classes)) + ["(different protocol)"]) + " |")
    lines += ["", f"nnU-Net: {nnunet['source']}; quoted, not measured here (five folds over 260 cases)."]
    if report["not_shipped"]:
        lines.append(f"Not shipped yet, so not in the table: {', '.join(report['not_shipped'])}.")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="only this package or architecture (the U-Net baseline is always scored)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=common.RESULTS_DIR / "accuracy.json",
                        help="results JSON; the Markdown table is written beside it (.md)")
    parser.add_argument("--json", action="store_true", help="print the report as the last line")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    started = time.perf_counter()
    packages = shipped_packages()
    baseline = next((p for p in packages if p.card["architecture"]["name"] == BASELINE_ARCHITECTURE), None)
    chosen = [p for p in packages if args.model in (None, p.name, p.card["architecture"]["name"]) or p is baseline]
    chosen.sort(key=lambda p: (p is not baseline, p.name))
    case_names = common_validation_cases(chosen)
    from training.evaluate import summarize

    per_model, rows = {}, []
    for package in chosen:
        per_model[package.name] = evaluate(package, case_names, args.device)
        rows.append(row(package, summarize(per_model[package.name], "validation")))
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
    print(markdown(report))
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
