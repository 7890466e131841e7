"""Temperature scaling (Guo et al., ICML 2017): one scalar T > 0 that divides the logits before the
softmax, fitted on validation cases by minimising the negative log-likelihood of their labels. It
changes how confident the probabilities are, never which class wins, so Dice is unchanged.

    python -m training.calibrate --model Resources/Models/hippocampus_difficulty_aware

fits T on the cases the package's card holds out (``training.validation_cases``) and prints it with
the expected calibration error of the foreground probabilities (``AttnSegLib.metrics``) and the mean
Dice before and after, each measured through the product path (``Predictor.predict``, with T applied
per window before the softmax, as the card's ``inference.temperature``). ``training.export`` fits and
records T the same way.

The fit uses the log of the probabilities the product path gives at T = 1: where one window covers a
voxel (and no test-time flip is averaged) that is the logits up to a per-voxel constant, which the
softmax ignores, so softmax(log p / T) is exactly what the product gives at T; where windows overlap
it approximates the blend. The ECE after the fit is measured, not assumed.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from tqdm import tqdm

from AttnSegLib.card import ModelCard
from AttnSegLib.image import read_image
from AttnSegLib.inference import Predictor
from AttnSegLib.metrics import calibration_bins, expected_calibration_error
from AttnSegLib.package import PackageError, load_package

from .config import ConfigError
from .data import CaseFiles, DatasetError, check_label_values, find_cases, label_lookup, label_on_grid
from .evaluate import CALIBRATION_BINS, dataset_description, select_split

TEMPERATURE_RANGE = (0.05, 20.0)  # the range package.validate_card accepts


def fit_temperature(log_probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """T minimising mean cross-entropy of softmax(log_probabilities / T) against ``labels``:
    (V, C) float log-probabilities (or logits) and (V,) int64 class indices -> T in TEMPERATURE_RANGE.
    Optimised over log T with L-BFGS (the loss is smooth and one-dimensional)."""
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    z, y = log_probabilities.double(), labels.long()
    optimiser = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        value = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        value.backward()
        return value

    optimiser.step(loss)
    return float(np.clip(log_t.exp().item(), *TEMPERATURE_RANGE))


def reference_on_grid(case: CaseFiles, data: dict, geometry) -> np.ndarray:
    """A case's label file as (D, H, W) class indices on ``geometry`` (the prediction's grid)."""
    label = read_image(case.label)
    values = check_label_values(label.array, label_lookup(data["classes"]), str(case.label))
    return label_on_grid(label.with_array(values), geometry)


def predict_cases(predictor: Predictor, cases: list[CaseFiles], data: dict,
                  progress: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each case's ((C, D, H, W) probabilities, (D, H, W) reference labels) on its input grid."""
    out = []
    for case in tqdm(cases, desc="calibrate", disable=not progress):
        result = predictor.predict([read_image(p) for p in case.images])
        out.append((result.probabilities.array, reference_on_grid(case, data, result.labels.geometry)))
    return out


def calibration_report(predicted: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Foreground ECE (pooled bins) and mean foreground Dice of argmax labels over the cases."""
    bins = sum(calibration_bins(p, y, CALIBRATION_BINS) for p, y in predicted)
    dice = []
    for p, y in predicted:
        labels = p.argmax(axis=0)
        for c in range(1, p.shape[0]):
            overlap, size = np.sum((labels == c) & (y == c)), np.sum(labels == c) + np.sum(y == c)
            dice.append(1.0 if size == 0 else 2 * overlap / size)
    return {"ece_foreground": round(expected_calibration_error(bins), 5), "mean_dice": round(float(np.mean(dice)), 4)}


def fit_on_cases(network, card: ModelCard | dict, cases: list[CaseFiles], data: dict, device: str = "auto",
                 progress: bool = True) -> tuple[float, dict]:
    """Fit T on ``cases`` through the product path of ``network`` with ``card`` (T = 1 during the fit),
    then measure with T applied: (T, {"before": calibration_report, "after": calibration_report,
    "labels_changed_voxels": voxels whose argmax label differs, "voxels": all voxels})."""
    card = ModelCard.parse(card, saved=False)
    before = predict_cases(Predictor(network, card=card.with_temperature(1.0), device=device, with_maps=False),
                           cases, data, progress)
    log_p = torch.cat([torch.from_numpy(np.log(np.clip(p, 1e-7, 1.0)).reshape(p.shape[0], -1).T) for p, _ in before])
    labels = torch.cat([torch.from_numpy(y.reshape(-1).astype(np.int64)) for _, y in before])
    temperature = fit_temperature(log_p, labels)
    after = predict_cases(Predictor(network, card=card.with_temperature(temperature), device=device, with_maps=False),
                          cases, data, progress)
    changed = sum(int(np.sum(a.argmax(axis=0) != b.argmax(axis=0))) for (a, _), (b, _) in zip(after, before))
    return temperature, {"before": calibration_report(before), "after": calibration_report(after),
                         "labels_changed_voxels": changed, "voxels": int(labels.numel())}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model package (folder, .zip or installed name)")
    parser.add_argument("--data", help="dataset folder or training config (default: the card's dataset)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        package = load_package(args.model)
        data, root = dataset_description(package.card, args.data, None)
        cases = select_split(find_cases(data, root), package.card, "validation")
        temperature, measured = fit_on_cases(package.build_network(), package.card, cases, data, args.device)
    except (PackageError, ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = {"model": package.name, "cases": len(cases), "temperature": round(temperature, 4), **measured}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{package.name}: temperature {temperature:.4f} fitted on {len(cases)} validation cases; foreground "
              f"ECE {measured['before']['ece_foreground']:.4f} -> {measured['after']['ece_foreground']:.4f}, mean "
              f"Dice {measured['before']['mean_dice']:.4f} -> {measured['after']['mean_dice']:.4f} "
              f"({measured['labels_changed_voxels']} of {measured['voxels']} voxels changed label)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
