"""Small real training set-ups for the training tests: a handful of real MSD hippocampus cases copied
into a tmp MSD folder, and configs (from the shipped ones) that train on them in seconds."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from training.config import load_config

CASES = ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006", "hippocampus_007")


def write_small_msd(root: Path, hippocampus_dir: Path, names=CASES) -> Path:
    """An MSD folder (dataset.json, imagesTr, labelsTr) holding ``names`` from the real hippocampus set."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for name in names:
        shutil.copy(hippocampus_dir / "imagesTr" / f"{name}.nii.gz", root / "imagesTr")
        shutil.copy(hippocampus_dir / "labelsTr" / f"{name}.nii.gz", root / "labelsTr")
    manifest = json.loads((hippocampus_dir / "dataset.json").read_text())
    manifest["training"] = [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names]
    (root / "dataset.json").write_text(json.dumps(manifest))
    return root


def small_config(base: str, data_root: Path, output: Path, **training) -> dict:
    """Config ``base`` re-pointed at ``data_root`` / ``output``: one validation case, no early stopping,
    ``training`` keys overridden (e.g. iterations=4)."""
    return load_config(base, {
        "data": {"root": str(data_root), "validation_fraction": 0.2},
        "training": {"iterations_per_epoch": 2, "validation_interval": 1000, **training},
        "validation": {"max_cases": 1},
        "output_dir": str(output),
    })
