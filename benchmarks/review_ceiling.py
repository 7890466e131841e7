"""How high a review map's average precision (AUPRC) for the wrong voxels can go on hippocampus crops.

    python benchmarks/review_ceiling.py                      # writes benchmarks/results/review_ceiling.{md,json}
    python benchmarks/review_ceiling.py --cases 2 --output /tmp/review_ceiling.json   # a quick check

Cases: the validation cases the package's card lists (``training.validation_cases``), run through the
product path (``Predictor.predict``, calibrated probabilities); the wrong voxels are where its labels
differ from the expert label.

A voxel's *error probability* is 1 - max_c p_c: the chance, by the model's own calibrated probabilities,
that its label is wrong. Pooled over the cases, the voxels are binned by it and each bin's measured
error rate is reported with its share of the wrong voxels (the table). Two facts bound a review map's
AUPRC from these: the precision of a set of flagged voxels is the error rate of what it holds, and the
wrong voxels where the model is at least 95 % sure (``confident_share_of_errors``) are found only after
nearly every voxel has been flagged, at a precision near the overall error rate. A map that finds those
confident errors needs information the probabilities lack, and a map holding it would let the
segmenter fix them instead. AUPRCs here are pooled over the cases (one ranking of every voxel), so the
review map and the error probability can be set side by side; the report also gives the precision of
the most doubtful 0.1 %, 0.5 % and 1.2 % of the voxels (1.2 %: about the share of wrong voxels).

Where the confident errors lie (``confident_errors``): the share of them within 0, 1 and 2 mm of the
*expert's* boundary (:func:`~AttnSegLib.metrics.boundary_distance_mm` of the reference labels; 0 mm: a
voxel on either side of it), and the share labelled with the other foreground class (Anterior for
Posterior or the reverse). Errors hugging the expert's boundary are where model and expert place the
same boundary a voxel or two apart, a tracing decision the image barely shows (the cases have one
tracing each: how far two experts would differ is not measured).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BIN_WIDTH = 0.05
CONFIDENT = 0.05
TOP_SHARES = (0.001, 0.005, 0.012)
EXPERT_BOUNDARY_MM = (0, 1, 2)


def error_rate_by_bin(error_probability: np.ndarray, wrong: np.ndarray) -> list[dict]:
    """(V,) error probabilities and (V,) wrong flags -> one row per non-empty bin of ``BIN_WIDTH``:
    its range, voxel count, measured error rate and share of all the wrong voxels."""
    index = np.minimum((error_probability / BIN_WIDTH).astype(int), int(1 / BIN_WIDTH) - 1)
    voxels = np.bincount(index, minlength=int(1 / BIN_WIDTH))
    errors = np.bincount(index, weights=wrong, minlength=int(1 / BIN_WIDTH))
    total = max(float(wrong.sum()), 1.0)
    return [{"from": round(i * BIN_WIDTH, 2), "to": round((i + 1) * BIN_WIDTH, 2), "voxels": int(voxels[i]),
             "error_rate": round(float(errors[i] / voxels[i]), 4), "share_of_errors": round(float(errors[i] / total), 4)}
            for i in np.flatnonzero(voxels)]


def precision_of_top(error_probability: np.ndarray, wrong: np.ndarray, share: float) -> float:
    """Share of wrong voxels among the ``share`` most doubtful voxels (by error probability)."""
    count = max(int(share * error_probability.size), 1)
    top = np.argpartition(-error_probability, count - 1)[:count]
    return float(wrong[top].mean())


def confident_error_places(reference: np.ndarray, labels: np.ndarray, confident_wrong: np.ndarray,
                           spacing) -> dict:
    """(D, H, W) expert labels, predicted labels and confidently wrong flags (bool) -> counts of the
    confidently wrong voxels: ``voxels``, ``within_<d>_mm`` of the expert's boundary for each of
    :data:`EXPERT_BOUNDARY_MM`, and ``other_foreground_class`` (both labels foreground, and different)."""
    from AttnSegLib.metrics import boundary_distance_mm

    distance = boundary_distance_mm(reference, spacing)
    counts = {"voxels": int(confident_wrong.sum())}
    for mm in EXPERT_BOUNDARY_MM:
        counts[f"within_{mm}_mm"] = int((confident_wrong & (distance <= mm + 1e-6)).sum()) if distance is not None else 0
    counts["other_foreground_class"] = int((confident_wrong & (reference > 0) & (labels > 0)).sum())
    return counts


def markdown(report: dict) -> str:
    top = ", ".join(f"{100 * s:g} %: {report['precision_of_top'][str(s)]:.3f}" for s in TOP_SHARES)
    places = report["confident_errors"]
    near = ", ".join(f"{100 * places[f'within_{mm}_mm']:.1f} % within {mm} mm" for mm in EXPERT_BOUNDARY_MM)
    swapped = f"{100 * places['other_foreground_class']:.1f} %"
    lines = [f"How high the review map's AUPRC can go: `{report['model']}` on {report['cases']} validation cases "
             f"of MSD Task04 Hippocampus ({100 * report['wrong_fraction']:.2f} % of the voxels wrong), measured by "
             "`python benchmarks/review_ceiling.py`.", "",
             f"- AUPRC, pooled over the cases: review map `{report['review_map']}` {report['review_map_auprc']:.3f}; "
             f"the error probability 1 - max p {report['error_probability_auprc']:.3f}.",
             f"- Wrong voxels where the model is at least {100 * (1 - CONFIDENT):g} % sure: "
             f"**{100 * report['confident_share_of_errors']:.1f} %** of all the wrong voxels.",
             f"- Precision of the most doubtful voxels: {top}.",
             f"- Of those confident errors, {near} of the expert's boundary (0 mm: on it); {swapped} are the other "
             "foreground class (Anterior for Posterior or the reverse).", "",
             "| error probability | voxels | measured error rate | share of the wrong voxels |", "|---|---:|---:|---:|"]
    lines += [f"| {r['from']:.2f}-{r['to']:.2f} | {r['voxels']} | {r['error_rate']:.3f} | {100 * r['share_of_errors']:.1f} % |"
              for r in report["bins"]]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="package name or folder (default: the default package)")
    parser.add_argument("--cases", type=int, default=None, help="the first N validation cases of the card (default all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=common.RESULTS_DIR / "review_ceiling.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    from AttnSegLib.image import read_image
    from AttnSegLib.inference import Predictor
    from AttnSegLib.metrics import error_detection_average_precision
    from AttnSegLib.package import default_package, load_package

    package = load_package(args.model) if args.model else default_package()
    names = common.validation_case_names(package, args.cases)
    root = common.data_root() / "hippocampus"
    predictor = Predictor(package, device="cpu")
    probabilities, errors, review = [], [], []
    places = {"voxels": 0, **{f"within_{mm}_mm": 0 for mm in EXPERT_BOUNDARY_MM}, "other_foreground_class": 0}
    for name in names:
        result = predictor.predict([read_image(root / "imagesTr" / f"{name}.nii.gz")])
        reference = np.rint(read_image(root / "labelsTr" / f"{name}.nii.gz").array)
        wrong = result.labels.array != reference
        probabilities.append(1.0 - result.probabilities.array.max(axis=0).ravel())
        confident_wrong = wrong & (probabilities[-1].reshape(wrong.shape) < CONFIDENT)
        for key, count in confident_error_places(reference, result.labels.array, confident_wrong,
                                                 result.labels.geometry.spacing).items():
            places[key] += count
        errors.append(wrong.ravel())
        review.append(result.maps[result.review_map_name].array.ravel())
    error_probability, wrong = np.concatenate(probabilities), np.concatenate(errors)
    rows = error_rate_by_bin(error_probability, wrong)
    report = {"model": package.name, "review_map": result.review_map_name, "cases": len(names),
              "machine": common.machine(args.threads), "wrong_fraction": round(float(wrong.mean()), 5),
              "review_map_auprc": round(error_detection_average_precision(np.concatenate(review), wrong), 4),
              "error_probability_auprc": round(error_detection_average_precision(error_probability, wrong), 4),
              "confident_share_of_errors": round(float(wrong[error_probability < CONFIDENT].sum() / max(wrong.sum(), 1)), 4),
              "precision_of_top": {str(s): round(precision_of_top(error_probability, wrong, s), 4) for s in TOP_SHARES},
              "confident_errors": {"voxels": places["voxels"],
                                   **{key: round(count / max(places["voxels"], 1), 4) for key, count in places.items()
                                      if key != "voxels"}},
              "bins": rows}
    common.write_report(args.output, report, markdown(report))
    print(json.dumps({k: report[k] for k in ("model", "cases", "review_map_auprc", "confident_share_of_errors",
                                             "confident_errors")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
