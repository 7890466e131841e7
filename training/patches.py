"""Random training patches from cases kept in memory: class-balanced crops and MONAI augmentation.

Every patch is a pure function of ``(seed, index)``: sample ``index`` picks its case and seeds the
MONAI transforms from that pair alone. A run therefore draws the same patches whether it runs
straight through or is resumed, with or without data-loader workers, and each
DistributedDataParallel rank draws its own (see :class:`IterationBatches`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAffined,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.transforms.utils import map_binary_to_indices, map_classes_to_indices
from torch.utils.data import Dataset, Sampler

from .data import Case

KEYS = ("image", "label")


def pad_to_patch(case: Case, patch_size) -> tuple[np.ndarray, np.ndarray]:
    """Image (M, D, H, W) and label (1, D, H, W), padded symmetrically to at least ``patch_size``.

    The image is padded with its minimum, as the predictor's sliding window pads, the label with 0.
    """
    pad = [(0, 0)] + [((max(p - s, 0)) // 2, max(p - s, 0) - (max(p - s, 0)) // 2)
                      for s, p in zip(case.image.shape[1:], patch_size)]
    image = np.pad(case.image, pad, constant_values=float(case.image.min()))
    label = np.pad(case.label[None], pad, constant_values=0)
    return image, label


def crop_transform(sampling: dict, patch_size, num_classes: int):
    """Class-balanced crop: ``class_ratios`` (one weight per class) or a foreground ``foreground_ratio``."""
    if sampling.get("class_ratios"):
        ratios = [float(r) for r in sampling["class_ratios"]]
        if len(ratios) != num_classes:
            raise ValueError(f"sampling.class_ratios has {len(ratios)} entries for {num_classes} classes")
        return RandCropByLabelClassesd(KEYS, "label", patch_size, ratios=ratios, num_classes=num_classes,
                                       num_samples=1, indices_key="indices", warn=False)
    ratio = float(sampling["foreground_ratio"])
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"sampling.foreground_ratio must be in [0, 1], got {ratio}")
    return RandCropByPosNegLabeld(KEYS, "label", patch_size, pos=ratio, neg=1.0 - ratio, num_samples=1,
                                  fg_indices_key="foreground", bg_indices_key="background")


def crop_indices(label: np.ndarray, num_classes: int, sampling: dict) -> dict[str, object]:
    """Voxel indices the crop transform samples centres from, computed once per case.

    (1, D, H, W) label -> ``{"indices": per-class lists}`` for class ratios, else
    ``{"foreground": ..., "background": ...}`` (flat index arrays).
    """
    if sampling.get("class_ratios"):
        return {"indices": map_classes_to_indices(label, num_classes)}
    foreground, background = map_binary_to_indices(label)
    return {"foreground": foreground, "background": background}


def augmentation_transforms(aug: dict) -> list:
    """MONAI transforms for the config's ``augmentation`` section (spatial first, then intensity).

    Rotation (degrees, about every axis) and scaling share one affine resampling; flips only along
    ``flip_axes`` (leave out an axis whose mirror changes a class's meaning, e.g. anterior/posterior).
    """
    transforms = []
    if aug.get("affine_prob", 0) > 0:
        rotate = math.radians(float(aug.get("rotate_deg", 0.0)))
        lo, hi = aug.get("scale", [1.0, 1.0])
        transforms.append(RandAffined(
            KEYS, prob=aug["affine_prob"], rotate_range=(rotate,) * 3,
            scale_range=((lo - 1.0, hi - 1.0),) * 3, mode=("bilinear", "nearest"), padding_mode="border"))
    if aug.get("flip_prob", 0) > 0:
        transforms += [RandFlipd(KEYS, prob=aug["flip_prob"], spatial_axis=int(axis))
                       for axis in aug.get("flip_axes", [])]
    if aug.get("intensity_scale_prob", 0) > 0:
        transforms.append(RandScaleIntensityd("image", factors=aug["intensity_scale"],
                                              prob=aug["intensity_scale_prob"]))
    if aug.get("intensity_shift_prob", 0) > 0:
        transforms.append(RandShiftIntensityd("image", offsets=aug["intensity_shift"],
                                              prob=aug["intensity_shift_prob"]))
    if aug.get("noise_prob", 0) > 0:
        transforms.append(RandGaussianNoised("image", prob=aug["noise_prob"], std=aug["noise_std"]))
    return transforms


def _changed_indices(case: Case, patch_size) -> np.ndarray | None:
    """Flat indices, in the padded case (:func:`pad_to_patch`), of the voxels a correction changed;
    None when the case has none."""
    if case.changed is None or not case.changed.any():
        return None
    pad = [max(p - s, 0) // 2 for s, p in zip(case.changed.shape, patch_size)]
    shape = [max(s, p) for s, p in zip(case.changed.shape, patch_size)]
    where = [axis + offset for axis, offset in zip(np.nonzero(case.changed), pad)]
    return np.ravel_multi_index(where, shape)


class PatchDataset(Dataset):
    """Index -> one augmented patch ``{"image": (M, *patch) float32, "label": (*patch) int64}``.

    ``cases`` are padded once to the patch size and kept in memory. The dataset is unbounded:
    any non-negative index is a valid sample. ``case_weights``: how often each case is drawn
    (normalised; default: all alike). ``changed_ratio``: the share of a corrected case's patches centred
    on a voxel its correction changed (:attr:`Case.changed`), the rest cropped as ``sampling`` says.
    """

    def __init__(self, cases: list[Case], patch_size, num_classes: int, sampling: dict, augmentation: dict,
                 seed: int, case_weights=None, changed_ratio: float = 0.0):
        if not cases:
            raise ValueError("no training cases")
        self.padded = [pad_to_patch(c, patch_size) for c in cases]
        self.indices = [crop_indices(label, num_classes, sampling) for _, label in self.padded]
        self.crop = crop_transform(sampling, list(patch_size), num_classes)
        self.changed = [_changed_indices(c, patch_size) for c in cases]
        self.changed_crop = RandCropByPosNegLabeld(KEYS, "label", list(patch_size), pos=1.0, neg=0.0, num_samples=1,
                                                   fg_indices_key="foreground", bg_indices_key="background")
        self.changed_ratio = float(changed_ratio)
        weights = np.ones(len(cases)) if case_weights is None else np.asarray(case_weights, dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.augment = Compose(augmentation_transforms(augmentation))
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.padded)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        case = int(rng.choice(len(self.padded), p=self.probabilities))
        image, label = self.padded[case]
        crop_seed, augment_seed = (int(s) for s in rng.integers(2**31, size=2))
        self.augment.set_random_state(seed=augment_seed)
        changed = self.changed[case]
        if changed is not None and rng.random() < self.changed_ratio:
            self.changed_crop.set_random_state(seed=crop_seed)
            sample = self.changed_crop({"image": image, "label": label, "foreground": changed,
                                        "background": changed})[0]
        else:
            self.crop.set_random_state(seed=crop_seed)
            sample = self.crop({"image": image, "label": label, **self.indices[case]})[0]
        sample = self.augment(sample)
        return {"image": torch.as_tensor(np.asarray(sample["image"]), dtype=torch.float32),
                "label": torch.as_tensor(np.asarray(sample["label"])[0], dtype=torch.long)}


class IterationBatches(Sampler[list[int]]):
    """Batch sampler for iterations ``[start, stop)``: iteration ``it`` on rank ``r`` of ``world``
    gets sample indices ``(it * world + r) * batch + b`` for ``b < batch``, so each rank draws its
    own patches and a resumed run continues with exactly the samples an uninterrupted run would draw.
    """

    def __init__(self, start: int, stop: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.start, self.stop, self.batch_size = start, stop, batch_size
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self):
        for it in range(self.start, self.stop):
            first = (it * self.world_size + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))
