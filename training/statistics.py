"""The training cases' intensity statistics, recorded in a model card as ``input_statistics``.

    python -m training.statistics --model Resources/Models/hippocampus_unet [--data ../shared/data/hippocampus]

Each training case is brought into the model frame exactly as for training and inference
(:func:`AttnSegLib.preprocess.to_model_frame`), which measures every modality's intensity profile while
normalising it; :func:`AttnSegLib.intensity.summarise` keeps their range per modality. Inference then
flags an input unlike them (:func:`AttnSegLib.intensity.input_notices`). :mod:`training.export` records
them in every new package; this command adds them to an existing package's card (the weights, and so
the card's ``weights_sha256``, are unchanged).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from AttnSegLib.image import ImageError, read_image
from AttnSegLib.intensity import summarise
from AttnSegLib.package import CARD_FILE, PackageError, load_package
from AttnSegLib.preprocess import to_model_frame

from .config import ConfigError
from .data import LAYOUTS, CaseFiles, DatasetError, find_cases
from .evaluate import dataset_description, select_split


def measure(cases: list[CaseFiles], data: dict, progress: bool = True) -> dict:
    """``input_statistics`` of ``cases`` described by the config's ``data`` section."""
    profiles = []
    for case in tqdm(cases, desc="intensity statistics", disable=not progress):
        prepared = to_model_frame([read_image(p) for p in case.images], data["modalities"],
                                  data.get("spacing_xyz_mm"), data.get("orientation"),
                                  data.get("crop_to_nonzero", False))
        profiles.append(prepared.profiles)
    return summarise(profiles, [m["name"] for m in data["modalities"]])


def with_statistics(card: dict, statistics: dict) -> dict:
    """``card`` with its ``input_statistics`` set, placed before ``metrics`` (the key order export writes)."""
    out = {}
    for key, value in card.items():
        if key == "metrics":
            out["input_statistics"] = statistics
        if key != "input_statistics":
            out[key] = value
    out.setdefault("input_statistics", statistics)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.statistics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model package folder whose card gets the statistics")
    parser.add_argument("--data", help="dataset folder or training config (default: the card's dataset)")
    parser.add_argument("--layout", choices=LAYOUTS,
                        help="layout of --data (default: detected)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        package = load_package(args.model)
        if not Path(package.path).is_dir():
            raise PackageError(f"{package.path}: give the package folder (a .zip cannot be updated in place)")
        data, root = dataset_description(package.card, args.data, args.layout)
        cases = select_split(find_cases(data, root), package.card, "train")
        statistics = measure(cases, data)
    except (PackageError, ConfigError, DatasetError, ImageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    card_path = Path(package.path) / CARD_FILE
    card_path.write_text(json.dumps(with_statistics(package.card.to_dict(), statistics), indent=2) + "\n")
    for modality in statistics["modalities"]:
        print(f"{package.name}: {modality['name']} over {modality['cases']} training cases, normalised quantiles "
              f"{modality['quantiles_median']} (median), outlier extent up to {modality['outlier_extent_max']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
