"""Can a learned map find a package's wrong voxels better than its entropy? Measured on held-out cases only.

    python benchmarks/learned_review_map.py --model hippocampus_difficulty_aware --tta \
        --output benchmarks/results/learned_review_map.json
    python benchmarks/learned_review_map.py --model hippocampus_ensemble --output /tmp/review_maps.json

Every case runs through the product path (``Predictor.predict`` with maps; ``--tta``: flip test-time
augmentation, which adds ``tta_variance``). Per voxel, features the product has or could compute at no
extra network pass: the ``uncertainty`` (entropy) and each other doubt map the package gives
(``tta_variance``, ``disagreement``), the boundary-distance baseline (``AttnSegLib.metrics``), the entropy
smoothed at 1 and 2 mm, entropy x boundary, the predicted class and the image's z-scored intensity and
gradient. An error model (logistic regression, ``linear``, or a two-layer perceptron of 32 units,
``mlp``, on the features standardised) predicts where the arg-max label is wrong:

* ``cross-validated``: trained on the held-out cases of four folds, scored on the fifth (five folds, so
  each held-out case is scored by a model that never saw it); the segmenter never trained on any;
* ``from training cases``: trained on ``--training-cases`` cases the segmenter trained on, scored on
  every held-out case, which shows whether the segmenter's errors on its own training cases teach
  where it errs on new ones.

Each map's score is the mean over the held-out cases with errors of its AUROC and average precision
(AUPRC) for the wrong voxels (``training.evaluate.review_case``'s measures), with the paired Wilcoxon
p-value of its AUPRC against the entropy's. The machine's load does not change these numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scipy.stats import wilcoxon

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "AttnSegExtension"))

from AttnSegLib.image import read_image  # noqa: E402
from AttnSegLib.inference import Predictor  # noqa: E402
from AttnSegLib.maps import DOUBT_MAPS  # noqa: E402
from AttnSegLib.metrics import (boundary_distance_doubt, error_detection_auroc,  # noqa: E402
                                error_detection_average_precision)
from AttnSegLib.package import load_package  # noqa: E402
from training.calibrate import reference_on_grid  # noqa: E402
from training.data import find_cases  # noqa: E402
from training.evaluate import BOUNDARY_BASELINE, dataset_description, select_split  # noqa: E402

FOLDS, HIDDEN, STEPS, BATCH = 5, 32, 300, 65536


def case_features(result, image: np.ndarray) -> dict[str, np.ndarray]:
    """Feature name -> (D, H, W) float32 for one prediction (``Predictor.predict``'s result) and its image."""
    entropy = result.maps["uncertainty"].array
    labels = result.labels.array
    spacing = result.labels.geometry.spacing
    boundary = boundary_distance_doubt(labels, spacing)
    sigma = [1.0 / s for s in reversed(spacing)]  # 1 mm along each (D, H, W) axis
    z = (image - image.mean()) / (image.std() + 1e-6)
    features = {name: result.maps[name].array for name in DOUBT_MAPS if name in result.maps}
    features.update({
        BOUNDARY_BASELINE: boundary, "entropy x boundary": entropy * boundary,
        "entropy 1 mm": ndimage.gaussian_filter(entropy, sigma), "entropy 2 mm": ndimage.gaussian_filter(entropy, [2 * s for s in sigma]),
        "intensity": z, "gradient": ndimage.gaussian_gradient_magnitude(z, sigma),
        **{f"class {c}": (labels == c).astype(np.float32) for c in range(1, len(result.classes))},
    })
    return {name: np.asarray(value, dtype=np.float32) for name, value in features.items()}


def predict_cases(predictor: Predictor, cases, data: dict) -> list[dict]:
    """Per case: {"name", "features": name -> (D, H, W), "wrong": (D, H, W) bool}."""
    out = []
    for case in cases:
        image = read_image(case.images[0])
        result = predictor.predict([read_image(p) for p in case.images])
        reference = reference_on_grid(case, data, result.labels.geometry)
        out.append({"name": case.name, "features": case_features(result, image.array.astype(np.float32)),
                    "wrong": result.labels.array != reference})
    return out


def design(case: dict, names: list[str]) -> np.ndarray:
    return np.stack([case["features"][n].ravel() for n in names], axis=1)


def fit_error_model(cases: list[dict], names: list[str], hidden: int, seed: int = 0):
    """A model of P(wrong) from ``names`` trained on ``cases``: returns case -> (D, H, W) scores."""
    torch.manual_seed(seed)
    x = torch.from_numpy(np.concatenate([design(c, names) for c in cases]))
    y = torch.from_numpy(np.concatenate([c["wrong"].ravel() for c in cases]).astype(np.float32))
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    layers = [torch.nn.Linear(len(names), 1)] if not hidden else [
        torch.nn.Linear(len(names), hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, 1)]
    model = torch.nn.Sequential(*layers)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(STEPS):
        batch = torch.randint(0, len(x), (BATCH,))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[batch])[:, 0], y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()

    def score(case: dict) -> np.ndarray:
        with torch.no_grad():
            values = model((torch.from_numpy(design(case, names)) - mean) / std)[:, 0]
        return values.numpy().reshape(case["wrong"].shape)
    return score


def scores(cases: list[dict], doubt) -> dict:
    """Mean AUROC and AUPRC of ``doubt(case)`` over the cases with errors, and the per-case AUPRCs."""
    rows = [(error_detection_auroc(doubt(c), c["wrong"]), error_detection_average_precision(doubt(c), c["wrong"]))
            for c in cases if c["wrong"].any()]
    return {"auroc": round(float(np.mean([r[0] for r in rows])), 4),
            "average_precision": round(float(np.mean([r[1] for r in rows])), 4), "per_case": [r[1] for r in rows]}


def cross_validated(cases: list[dict], names: list[str], hidden: int) -> dict:
    held_out_scores = {}
    for fold in range(FOLDS):
        train = [c for i, c in enumerate(cases) if i % FOLDS != fold]
        model = fit_error_model(train, names, hidden)
        held_out_scores.update({c["name"]: model(c) for c in cases[fold::FOLDS]})
    return scores(cases, lambda c: held_out_scores[c["name"]])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hippocampus_difficulty_aware")
    parser.add_argument("--tta", action="store_true", help="flip test-time augmentation (adds tta_variance)")
    parser.add_argument("--training-cases", type=int, default=40, help="training cases for 'from training cases'")
    parser.add_argument("--output", help="JSON file for the results (default: print only)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    package = load_package(args.model)
    data, root = dataset_description(package.card, None, None)
    every = find_cases(data, root)
    predictor = Predictor(package, device="cpu", tta=args.tta)
    held_out = predict_cases(predictor, select_split(every, package.card, "validation"), data)
    training = predict_cases(predictor, select_split(every, package.card, "train")[:args.training_cases], data)
    names = list(held_out[0]["features"])
    entropy = scores(held_out, lambda c: c["features"]["uncertainty"])
    report = {"model": package.name, "tta": args.tta, "held_out_cases": len(held_out),
              "training_cases": len(training), "features": names,
              "wrong_fraction": {"held_out": round(float(np.mean([c["wrong"].mean() for c in held_out])), 5),
                                 "training": round(float(np.mean([c["wrong"].mean() for c in training])), 5)},
              "maps": {}}
    for name in [n for n in names if n in DOUBT_MAPS or n == BOUNDARY_BASELINE]:
        report["maps"][name] = {"held_out": scores(held_out, lambda c: c["features"][name]),
                                "training_cases": scores(training, lambda c: c["features"][name])}
    for kind, hidden in (("linear", 0), ("mlp", HIDDEN)):
        report["maps"][f"{kind} error model, cross-validated"] = {"held_out": cross_validated(held_out, names, hidden)}
        model = fit_error_model(training, names, hidden)
        report["maps"][f"{kind} error model, from training cases"] = {"held_out": scores(held_out, model)}
    for name, entry in report["maps"].items():
        measured = entry["held_out"]
        differences = np.subtract(measured.pop("per_case"), entropy["per_case"])
        measured["wilcoxon_p_vs_entropy"] = None if not np.any(differences) else float(f"{wilcoxon(differences).pvalue:.3g}")
        if "training_cases" in entry:
            entry["training_cases"].pop("per_case")
    text = json.dumps(report, indent=1)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
