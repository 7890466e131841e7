"""The corrected-case layout: how a segmentation the user corrected is stored for training.

The Slicer module and the web app write a case with :func:`write_case`; ``training/data.py`` (layout
``corrected``) finds and reads it with the names here::

    <case>/image_0000.nii.gz ...   one per modality, in the card's order
           label.nii.gz            the corrected segmentation (class values)
           model_label.nii.gz      the model's own output
           difference.nii.gz       1 where the correction differs from the model
           review_map.nii.gz       the review map (the map doubtful regions are ranked by)
           case.json               model name and hash, class names, provenance, refinement clicks
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .image import Image, apply_umask, write_image
from .swap import replace_folder

IMAGE_STEM = "image"  # image_0000.nii.gz, image_0001.nii.gz ... (nnU-Net numbering)
LABEL_FILE = "label.nii.gz"
MODEL_LABEL_FILE = "model_label.nii.gz"
DIFFERENCE_FILE = "difference.nii.gz"
REVIEW_MAP_FILE = "review_map.nii.gz"
RECORD_FILE = "case.json"
OPTIONAL_FILES = (DIFFERENCE_FILE, RECORD_FILE)  # what training reads besides the images and the label


def image_file(index: int) -> str:
    return f"{IMAGE_STEM}_{index:04d}.nii.gz"


def is_case_folder(folder: Path) -> bool:
    """A folder holding a corrected case (its label at least)."""
    return (Path(folder) / LABEL_FILE).is_file()


def safe_case_name(name: str) -> str:
    """A folder name from a node name: letters, digits, '.', '_' and '-' only."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return safe or "case"


def write_case(target: Path, images: list[Image], label: Image, model_label: Image, review_map: Image,
               record: dict, overwrite: bool = False) -> Path:
    """Write one case into the folder ``target``: written beside it and moved in whole. An existing case is
    replaced only with ``overwrite`` (else :class:`FileExistsError`). ``label`` and ``model_label``: class
    values on one grid; the difference is computed here. Returns ``target``."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already holds a case; choose another case name or overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for index, image in enumerate(images):
            write_image(image, staging / image_file(index))
        write_image(label, staging / LABEL_FILE)
        write_image(model_label.with_array(model_label.array.astype(label.array.dtype)), staging / MODEL_LABEL_FILE)
        write_image(label.with_array(difference(label, model_label)), staging / DIFFERENCE_FILE)
        write_image(review_map.with_array(review_map.array.astype(np.float32)), staging / REVIEW_MAP_FILE)
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        apply_umask(staging)  # mkdtemp makes it 0700: the case folder gets the user's usual mode
        if target.is_dir() and not target.is_symlink():
            replace_folder(staging, target)  # in one step; staging now holds the previous case
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def difference(label: Image, model_label: Image) -> np.ndarray:
    """(D, H, W) uint8: 1 where the corrected ``label`` differs from the model's."""
    return (label.array != model_label.array).astype(np.uint8)
