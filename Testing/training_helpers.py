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


def write_corrected_case(folder: Path, hippocampus_dir: Path, name: str, package) -> Path:
    """Case ``name`` saved as the module's ``exportCorrection`` saves a correction: the real image, the
    expert label as the corrected label, ``package``'s own output as model_label, the voxels where they
    differ, and case.json naming the model and its sha256."""
    import numpy as np

    from AttnSegLib.image import read_image, write_image
    from AttnSegLib.inference import Predictor

    image = read_image(hippocampus_dir / "imagesTr" / f"{name}.nii.gz")
    label = read_image(hippocampus_dir / "labelsTr" / f"{name}.nii.gz")
    expert = label.with_array(np.rint(label.array).astype(np.uint8))
    model_label = Predictor(package, device="cpu", with_maps=False).predict([image]).labels
    difference = (expert.array != model_label.array).astype(np.uint8)
    case = folder / name
    write_image(image, case / "image_0000.nii.gz")
    write_image(expert, case / "label.nii.gz")
    write_image(model_label.with_array(model_label.array.astype(np.uint8)), case / "model_label.nii.gz")
    write_image(expert.with_array(difference), case / "difference.nii.gz")
    (case / "case.json").write_text(json.dumps({"case": name, "model_name": package.name,
                                                "model_sha256": package.sha256,
                                                "changed_voxels": int(difference.sum())}))
    return case
