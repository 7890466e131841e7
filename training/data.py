"""Training data: find the cases of a dataset on disk, split them, and load them into the model frame.

Layouts (``data.layout`` in a config; :func:`detect_layout` guesses one from a folder):

* ``msd``: Medical Segmentation Decathlon / nnU-Net raw: ``dataset.json`` + ``imagesTr/`` + ``labelsTr/``;
  one file per case (``<case>.nii.gz``) or one per modality (``<case>_0000.nii.gz``, ``_0001``...).
* ``iseg``: iSeg-2017: ``subject-<n>-T1.<ext>``, ``subject-<n>-T2.<ext>``, ``subject-<n>-label.<ext>``
  (Analyze ``.hdr/.img`` as distributed, or any format SimpleITK reads).
* ``brats``: one folder per case, one file per modality, chosen with each modality's ``pattern`` (glob,
  case-insensitive; default ``*<name>*``) and the label with ``data.label_pattern``.
* ``folder``: ``images/<case>.nii.gz`` (or ``<case>_0000.nii.gz`` per modality) + ``labels/<case>.nii.gz``.
* ``corrected``: cases exported from the Slicer module: ``<case>/image_0000.nii.gz`` (one per modality,
  nnU-Net numbering), ``<case>/label.nii.gz`` (the corrected label), ``difference.nii.gz`` (1 where the
  correction changed the model's output; fine-tuning samples patches around those voxels), ``case.json``
  (the model and its sha256 the case was segmented with: the fine-tuned card's lineage), plus
  ``model_label.nii.gz`` and ``review_map.nii.gz``. A case folder that cannot be used (no label, a
  missing image, an unreadable file) is skipped with a warning, unless ``strict``.

Every case is read with :mod:`AttnSegLib.image` and brought to the model frame with
:func:`AttnSegLib.preprocess.to_model_frame` (orientation, spacing, per-modality normalisation), the same
function the product runs before inference; its label follows on the same grid (nearest neighbour).
Label values are checked (integers, known values) and mapped to class indices 0..C-1.
"""
from __future__ import annotations

import fnmatch
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AttnSegLib import corrected_case
from AttnSegLib.errors import AttnSegError
from AttnSegLib.image import IMAGE_SUFFIXES, Geometry, Image, ImageError, case_name, label_dtype, read_image
from AttnSegLib.preprocess import to_model_frame

LAYOUTS = ("msd", "iseg", "brats", "folder", "corrected")
SPLIT_NAMES = ("train", "validation")
_READABLE = IMAGE_SUFFIXES + (".hdr",)
_BRATS_LABEL_PATTERNS = ("*_seg.nii*", "*-seg.nii*", "OTMultiClass*", "*label*")


class DatasetError(AttnSegError, ValueError):
    """A dataset folder or file cannot be used; the message names the file and the fix."""


class LabelError(DatasetError):
    """A label file holds values that are not the dataset's class values."""


class SkippedCaseWarning(UserWarning):
    """A case of a corrections folder could not be used and was left out (``strict`` refuses instead)."""


@dataclass(frozen=True)
class CaseFiles:
    """One case on disk: ``images`` in the config's modality order, ``label`` (None when unlabelled);
    for a corrected case ``difference`` (changed voxels) and ``record`` (``case.json``) when present."""

    name: str
    images: tuple[Path, ...]
    label: Path | None
    difference: Path | None = None
    record: Path | None = None


@dataclass
class Case:
    """One case in the model frame, kept in memory.

    ``image``: (M, D, H, W) float32, normalised. ``label``: (D, H, W) class indices
    (uint8, uint16 beyond 256 classes).
    ``changed``: (D, H, W) bool, the voxels a correction changed (corrected cases with a difference map).
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    changed: np.ndarray | None = None


# -- finding cases -------------------------------------------------------------------------------
def _case_folders(root: Path) -> list[Path]:
    """Sub-folders holding cases, sorted; hidden ones (e.g. an exporter's unfinished staging
    folder ``.<case>.xyz``) are not cases."""
    return [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_READABLE)


def _strip_suffix(name: str) -> str:
    return case_name(name) if not name.lower().endswith(".hdr") else name[:-4]


def _per_modality_files(folder: Path, stem: str, count: int, where: str) -> tuple[Path, ...]:
    """``<stem>_0000.<ext>``... (nnU-Net numbering) if present, else the single ``<stem>.<ext>``."""
    numbered = []
    for index in range(count):
        found = [p for p in folder.glob(f"{stem}_{index:04d}.*") if _is_image(p)]
        if found:
            numbered.append(found[0])
    if numbered:
        if len(numbered) != count:
            raise DatasetError(f"{where}: case {stem!r} has {len(numbered)} of the {count} modality files "
                               f"{stem}_0000..{stem}_{count - 1:04d}; add the missing ones")
        return tuple(numbered)
    single = [p for p in folder.glob(f"{stem}.*") if _is_image(p)]
    if not single:
        raise DatasetError(f"{where}: no image for case {stem!r} in {folder}")
    if count != 1:
        raise DatasetError(f"{where}: case {stem!r} has one image file but the config names {count} "
                           f"modalities; store one file per modality as {stem}_0000, {stem}_0001, ...")
    return (single[0],)


def msd_cases(root: Path, modality_count: int) -> list[CaseFiles]:
    """MSD / nnU-Net raw layout: cases listed in ``dataset.json`` (``training``) or found in ``imagesTr``."""
    manifest = root / "dataset.json"
    if not manifest.is_file():
        raise DatasetError(f"{root}: no dataset.json; an MSD / nnU-Net dataset has dataset.json, imagesTr/ "
                           "and labelsTr/ (or set data.layout to the right layout)")
    listed = json.loads(manifest.read_text()).get("training")
    if listed:
        names = [_strip_suffix(Path(entry["image"]).name) for entry in listed]
    else:
        names = sorted({re.sub(r"_\d{4}$", "", _strip_suffix(p.name))
                        for p in (root / "imagesTr").iterdir() if _is_image(p)})
    cases = []
    for name in names:
        labels = [p for p in (root / "labelsTr").glob(f"{name}.*") if _is_image(p)]
        if not labels:
            raise DatasetError(f"{root}: no label for case {name!r} in labelsTr/")
        cases.append(CaseFiles(name, _per_modality_files(root / "imagesTr", name, modality_count, str(root)),
                               labels[0]))
    return cases


def iseg_cases(root: Path, modalities: list[str]) -> list[CaseFiles]:
    """iSeg-2017: ``subject-<n>-<modality>.<ext>`` and ``subject-<n>-label.<ext>`` in one folder."""
    pattern = re.compile(r"^subject-(\d+)-([A-Za-z0-9]+)\.", re.IGNORECASE)
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(root.iterdir()):
        match = pattern.match(path.name)
        if match and _is_image(path):
            found.setdefault(match.group(1), {})[match.group(2).lower()] = path
    if not found:
        raise DatasetError(f"{root}: no iSeg files (subject-<n>-T1.hdr, subject-<n>-T2.hdr, subject-<n>-label.hdr)")
    cases = []
    for number in sorted(found, key=int):
        files = found[number]
        missing = [m for m in modalities if m.lower() not in files]
        if missing:
            raise DatasetError(f"{root}: subject-{number} lacks modality file(s) {', '.join(missing)}")
        cases.append(CaseFiles(f"subject-{number}", tuple(files[m.lower()] for m in modalities),
                               files.get("label")))
    return cases


def _match_one(folder: Path, patterns: list[str], what: str) -> Path:
    files = [p for p in sorted(folder.iterdir()) if _is_image(p)]
    for pattern in patterns:
        hits = [p for p in files if fnmatch.fnmatch(p.name.lower(), pattern.lower())]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise DatasetError(f"{folder}: pattern {pattern!r} for {what} matches {len(hits)} files "
                               f"({', '.join(p.name for p in hits)}); give a more specific pattern in the config")
    raise DatasetError(f"{folder}: no file for {what} (tried {', '.join(patterns)}); "
                       f"files here: {', '.join(p.name for p in files) or 'none'}")


def brats_cases(root: Path, modalities: list[dict], label_pattern: str | None) -> list[CaseFiles]:
    """BraTS: one folder per case, one file per modality (matched by pattern), one label file."""
    folders = _case_folders(root)
    if not folders:
        raise DatasetError(f"{root}: no case folders; the BraTS layout has one folder per case")
    label_patterns = [label_pattern] if label_pattern else list(_BRATS_LABEL_PATTERNS)
    cases = []
    for folder in folders:
        images = tuple(_match_one(folder, [m.get("pattern", f"*{m['name']}*")], f"modality {m['name']}")
                       for m in modalities)
        cases.append(CaseFiles(folder.name, images, _match_one(folder, label_patterns, "the label")))
    return cases


def folder_cases(root: Path, modality_count: int) -> list[CaseFiles]:
    """``images/`` + ``labels/`` with the same case names."""
    images, labels = root / "images", root / "labels"
    if not images.is_dir() or not labels.is_dir():
        raise DatasetError(f"{root}: the folder layout needs images/ and labels/ subfolders")
    cases = []
    for label in sorted(p for p in labels.iterdir() if _is_image(p)):
        name = _strip_suffix(label.name)
        cases.append(CaseFiles(name, _per_modality_files(images, name, modality_count, str(root)), label))
    if not cases:
        raise DatasetError(f"{labels}: no label files")
    return cases


def corrected_cases(root: Path, modality_count: int, strict: bool = False) -> list[CaseFiles]:
    """Cases exported from the Slicer module: ``<case>/image_0000.nii.gz``... and ``<case>/label.nii.gz``
    (with ``difference.nii.gz`` and ``case.json`` when there). A folder that is not a usable case is
    skipped with a :class:`SkippedCaseWarning`, or refused with ``strict``."""
    cases = []
    for folder in _case_folders(root):
        try:
            if not corrected_case.is_case_folder(folder):
                raise DatasetError(f"{folder}: no {corrected_case.LABEL_FILE}; export the corrected segmentation "
                                   "from the AttnSeg module")
            label = folder / corrected_case.LABEL_FILE
            images = _per_modality_files(folder, corrected_case.IMAGE_STEM, modality_count, str(folder))
        except DatasetError as err:
            skip_or_raise(err, strict)
            continue
        optional = [folder / n if (folder / n).is_file() else None for n in corrected_case.OPTIONAL_FILES]
        cases.append(CaseFiles(folder.name, images, label, *optional))
    if not cases:
        raise DatasetError(f"{root}: no usable case folders exported from the AttnSeg module")
    return cases


def skip_or_raise(err: Exception, strict: bool) -> None:
    """Refuse (``strict``) or leave out, with a warning, a case that cannot be used."""
    if strict:
        raise err if isinstance(err, DatasetError) else DatasetError(str(err))
    warnings.warn(f"skipped: {err} (pass --strict to stop instead)", SkippedCaseWarning, stacklevel=2)


def detect_layout(root: Path) -> str:
    """Guess the layout of a dataset folder (see the module docstring)."""
    root = Path(root)
    if (root / "dataset.json").is_file():
        return "msd"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "folder"
    if any(re.match(r"subject-\d+-", p.name, re.IGNORECASE) for p in root.iterdir()):
        return "iseg"
    folders = _case_folders(root)
    if folders and all(corrected_case.is_case_folder(p) for p in folders):
        return "corrected"
    if folders:
        return "brats"
    raise DatasetError(f"{root}: cannot tell the dataset layout; set data.layout to one of {', '.join(LAYOUTS)}")


def find_cases(data: dict, root: Path, strict: bool = False) -> list[CaseFiles]:
    """All cases of the dataset described by a config's ``data`` section, sorted by name (``strict``:
    refuse a corrections folder with an unusable case instead of skipping it)."""
    if not root.is_dir():
        raise DatasetError(f"data root {root} is not a folder; set data.root in the config (or pass --data)")
    layout = data["layout"]
    modalities = data["modalities"]
    if layout == "msd":
        cases = msd_cases(root, len(modalities))
    elif layout == "iseg":
        cases = iseg_cases(root, [m["name"] for m in modalities])
    elif layout == "brats":
        cases = brats_cases(root, modalities, data.get("label_pattern"))
    elif layout == "folder":
        cases = folder_cases(root, len(modalities))
    elif layout == "corrected":
        cases = corrected_cases(root, len(modalities), strict)
    else:
        raise DatasetError(f"unknown data.layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise DatasetError(f"{root}: case names are not unique")
    return sorted(cases, key=lambda c: c.name)


# -- split ---------------------------------------------------------------------------------------
def make_split(names: list[str], validation_fraction: float, seed: int) -> dict[str, list[str]]:
    """A seeded split of case names into ``train`` and ``validation`` (at least one case each).

    Depends only on the set of names, the fraction and the seed (not on the order given).
    """
    names = sorted(names)
    if len(names) < 2:
        raise DatasetError(f"need at least 2 cases to split into train and validation, found {len(names)}")
    order = np.random.default_rng(seed).permutation(len(names))
    count = min(max(1, round(len(names) * validation_fraction)), len(names) - 1)
    validation = sorted(names[i] for i in order[:count])
    return {"train": sorted(set(names) - set(validation)), "validation": validation}


def load_or_make_split(path: Path, names: list[str], validation_fraction: float, seed: int) -> dict[str, list[str]]:
    """The split stored at ``path``, or a new seeded one written there (json)."""
    if path.is_file():
        split = json.loads(path.read_text())
        unknown = sorted(set(split.get("train", []) + split.get("validation", [])) - set(names))
        if set(split) != set(SPLIT_NAMES) or unknown:
            raise DatasetError(f"{path}: the stored split does not fit this dataset"
                               + (f" (unknown cases {', '.join(unknown[:5])})" if unknown else "")
                               + "; delete it to make a new one")
        return split
    split = make_split(names, validation_fraction, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**split}, indent=1) + "\n")
    return split


# -- loading -------------------------------------------------------------------------------------
def label_lookup(classes: list[dict]) -> dict[int, int]:
    """Stored label value -> class index, from each class's ``source_value`` (default: its value)."""
    return {int(c.get("source_value", c["value"])): int(c["value"]) for c in classes}


def check_label_values(array: np.ndarray, lookup: dict[int, int], where: str) -> np.ndarray:
    """(D, H, W) stored label values -> class indices (:func:`~AttnSegLib.image.label_dtype`: uint16 beyond
    256 classes); :class:`LabelError` for anything else."""
    values = np.unique(array)
    fractional = values[values != np.round(values)] if np.issubdtype(values.dtype, np.floating) else []
    if len(fractional):
        shown = ", ".join(f"{v:g}" for v in fractional[:8])
        raise LabelError(f"{where}: label values must be integers, found {shown}"
                         f"{' ...' if len(fractional) > 8 else ''}; the file is probably an image or a "
                         "probability map, not a label map (or was resampled with linear interpolation)")
    unknown = sorted(int(v) for v in values if int(v) not in lookup)
    if unknown:
        raise LabelError(f"{where}: label values {unknown} are not among the dataset's classes "
                         f"{sorted(lookup)}; fix the label file or add the classes (with source_value) "
                         "to data.classes in the config")
    table = np.zeros(max(lookup) + 1, dtype=label_dtype(max(lookup.values()) + 1))
    for stored, index in lookup.items():
        table[stored] = index
    return table[array.astype(np.int64)]


def label_on_grid(label: Image, geometry: Geometry) -> np.ndarray:
    """The label resampled (nearest neighbour) onto ``geometry``; unchanged when already on it."""
    if label.geometry.same_grid(geometry):
        return label.array
    reference = sitk.Image(list(geometry.size), sitk.sitkUInt8)
    reference.SetSpacing(geometry.spacing)
    reference.SetOrigin(geometry.origin)
    reference.SetDirection(geometry.direction)
    moved = sitk.Resample(label.to_sitk(), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(moved)


def _on_model_grid(image: Image, prepared) -> np.ndarray:
    """A label-like image (nearest neighbour) on the prepared image's frame and crop: (D, H, W)."""
    array = label_on_grid(image, prepared.frame)
    return array[tuple(slice(a, b) for a, b in prepared.crop)]


def load_case(files: CaseFiles, data: dict) -> Case:
    """Read one case and bring image and label (and a corrected case's changed voxels) into the model
    frame described by ``data``."""
    if files.label is None:
        raise DatasetError(f"case {files.name} has no label file; training needs a label for every case")
    prepared = to_model_frame([read_image(p) for p in files.images], data["modalities"],
                              data.get("spacing_xyz_mm"), data.get("orientation"),
                              data.get("crop_to_nonzero", False))
    label_image = read_image(files.label)
    label_image = label_image.with_array(check_label_values(label_image.array, label_lookup(data["classes"]),
                                                            str(files.label)))
    label = _on_model_grid(label_image, prepared)
    if label.shape != prepared.array.shape[1:]:
        raise DatasetError(f"{files.label}: label grid {label.shape} does not match the image {prepared.array.shape[1:]}")
    changed = None
    if files.difference is not None:
        difference = read_image(files.difference)
        changed = _on_model_grid(difference.with_array((difference.array > 0).astype(np.uint8)), prepared) > 0
    return Case(files.name, prepared.array.astype(np.float32, copy=False), np.ascontiguousarray(label),
                changed)


def load_cases(files: list[CaseFiles], data: dict, progress=None, skip_broken: bool = False) -> list[Case]:
    """Load (and keep in memory) every case; ``progress`` wraps the iterable (e.g. tqdm).
    ``skip_broken``: a case that cannot be read is left out with a :class:`SkippedCaseWarning`."""
    iterable = progress(files) if progress is not None else files
    cases = []
    for f in iterable:
        try:
            cases.append(load_case(f, data))
        except (DatasetError, ImageError) as err:
            skip_or_raise(err, not skip_broken)
    return cases
