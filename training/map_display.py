"""How a card shows each map: its unit and a display range, with its measured information.

    python -m training.map_display --model Resources/Models/hippocampus_rsanet [--cases A B ...]

``training.export`` does this for every package it writes; this command does it again for a package
already shipped, from its validation cases (the card's ``validation_cases``, through the product path
as in ``training.evaluate --maps``). It sets, in the card:

* ``maps.<name>.meaning`` and ``unit``: what the map shows (high values included) and the unit of its
  values, as the network gives them (``map_descriptions()``, ``map_units()``);
* ``maps.<name>.display_range`` [lo, hi]: the mean over the cases of the 1st and 99th percentiles of
  the map's values (the lowest and highest over its channels), the window that shows its structure;
  [hi, lo] for a map the network says is high where the segmentation is sure (a confidence:
  ``maps_high_when_sure``), so its doubtful low values get the bright colours;
* ``metrics.map_information``: per map volume (each channel of a multi-channel map), the mean of the
  figures of ``AttnSegLib.map_information`` over the cases (entropy relative to a flat map, ratio to
  uniform, share of the mass in the target, right against wrong voxels);
* how each doubt map finds the wrong voxels (``metrics.error_detection_auroc``,
  ``error_detection_average_precision``, ``found_within_5_percent``, with ``wrong_fraction`` and
  ``ece_foreground``) and ``inference.review_map``, the doubt map with the highest average precision
  (:func:`choose_review_map`; :func:`apply_review`, also used by ``training.export`` and
  ``training.ensemble``).

A meaning or unit the card already has is kept: a map head retrained for another purpose
(``training.error_map``) writes its own, which the network's generic text must not overwrite.

Only ``model.json`` is rewritten (as ``AttnSegLib.package.save_package`` writes it); the weights are
untouched, and the package is reloaded to check the card.
"""
from __future__ import annotations

import argparse
import json
import sys

from AttnSegLib.card import UNCERTAINTY
from AttnSegLib.inference import Predictor
from AttnSegLib.package import CARD_FILE, PackageError, load_package

from .config import ConfigError
from .data import DatasetError, find_cases
from .evaluate import Evaluation, dataset_description, evaluate_cases, select_cases, select_split, \
    summarize_error_detection, summarize_map_information, summarize_review

# A model map replaces the uncertainty as the review map only when its average precision is higher by more
# than this: two trainings of the same confidence network differed by 0.003 (training/error_map.py).
REVIEW_MARGIN = 0.01


def _significant(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits}g}")


def display_ranges(map_names, information: dict[str, dict], high_when_sure=()) -> dict[str, list[float]]:
    """Card map name -> [lo, hi]: over the map's volumes (``name`` itself or ``name.<channel>``), the
    lowest mean 1st percentile and the highest mean 99th percentile, to 3 significant digits; [hi, lo]
    for the names in ``high_when_sure``."""
    ranges = {}
    for name in map_names:
        volumes = [f for volume, f in information.items() if volume == name or volume.rpartition(".")[0] == name]
        if volumes:
            low = min(f["value_p01"] for f in volumes)
            high = max(f["value_p99"] for f in volumes)
            ranges[name] = [_significant(low), _significant(high) if high > low else _significant(low) + 1e-3]
            if name in high_when_sure:
                ranges[name].reverse()
    return ranges


def apply_to_card(card: dict, network, evaluation: Evaluation) -> dict:
    """``card`` with the meanings, units, display ranges and map information of ``evaluation`` (cases
    evaluated with maps); returns the information."""
    information = summarize_map_information(evaluation)
    meanings, units = network.map_descriptions(), network.map_units()
    ranges = display_ranges(card.get("maps", {}), information, network.maps_high_when_sure)
    for name, entry in card.get("maps", {}).items():
        if name in meanings:
            entry.setdefault("meaning", meanings[name])
        if name in units:
            entry.setdefault("unit", units[name])
        if name in ranges:
            entry["display_range"] = ranges[name]
    card.setdefault("metrics", {})["map_information"] = information
    return information


def choose_review_map(precision: dict[str, float], map_names) -> str:
    """The review map: of the uncertainty and the card's ``map_names``, the one with the highest average
    precision (``precision``: map -> mean AUPRC for the wrong voxels), unless it beats the uncertainty by
    no more than REVIEW_MARGIN. Within that margin two maps rank the errors alike, and the uncertainty
    keeps the meaning the front ends' review threshold (0.5) was set for: the default package's
    retrained difficulty map, level with it, flags 0.04-0.14 % of a crop at 0.5 where the uncertainty
    flags 0.8-1.0 % and finds 41-47 % of the wrong voxels (README, issue 19)."""
    doubt = {name: value for name, value in precision.items() if name in map_names or name == UNCERTAINTY}
    best = max(doubt, key=doubt.get)
    if UNCERTAINTY in doubt and doubt[best] - doubt[UNCERTAINTY] <= REVIEW_MARGIN:
        return UNCERTAINTY
    return best


def apply_review(card: dict, evaluation: Evaluation) -> dict:
    """``card`` with how its doubt maps found the wrong voxels of ``evaluation`` (cases evaluated with
    maps) and its ``inference.review_map`` (:func:`choose_review_map`: by average precision, not AUROC,
    on which a map of mere nearness to the predicted boundary scores 0.98). Returns the review summary
    (``training.evaluate.summarize_review``)."""
    review = summarize_review(evaluation)
    precision = {name: m["average_precision"] for name, m in review["maps"].items()}
    card.setdefault("metrics", {}).update({
        "error_detection_auroc": summarize_error_detection(evaluation.error_detection),
        "error_detection_average_precision": precision,
        "found_within_5_percent": {name: m["found_within_0.05"] for name, m in review["maps"].items()},
        "wrong_fraction": review["wrong_fraction"], "ece_foreground": review["ece_foreground"],
    })
    if precision:
        card.setdefault("inference", {})["review_map"] = choose_review_map(precision, card.get("maps", {}))
    return review


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.map_display", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model package folder to update")
    parser.add_argument("--cases", nargs="+", metavar="CASE", help="only these validation cases")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        package = load_package(args.model)
        if package.path.is_file():
            raise PackageError(f"{package.path}: update a package folder, not a .zip")
        data, root = dataset_description(package.card, None, None)
        cases = select_split(find_cases(data, root), package.card, "validation")
        if args.cases:
            cases = select_cases(cases, args.cases, "validation")
        predictor = Predictor(package, device=args.device, with_maps=True)
        evaluation = evaluate_cases(predictor, cases, data)
    except (PackageError, ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    card = package.card.to_dict()
    apply_to_card(card, predictor.network, evaluation)
    apply_review(card, evaluation)
    (package.path / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    saved = load_package(package.path)
    for name, entry in saved.maps.items():
        print(f"{name}: {entry.get('display_range')} {entry.get('unit', '')}")
    print(f"review map: {saved.card.inference.review_map}; average precision for the wrong voxels: "
          f"{saved.card.get('metrics', {}).get('error_detection_average_precision')}")
    print(f"updated {saved.path} from {len(cases)} validation cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
