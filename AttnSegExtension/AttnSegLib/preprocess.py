"""Bring input volumes into a model's frame, and bring predictions back, exactly.

Forward (:func:`to_model_frame`): check and align modalities -> reorient to the card's orientation ->
resample to the card's spacing -> optional crop to the non-zero box -> per-modality normalisation.
Inverse (:meth:`Prepared.to_input_grid`): un-crop -> resample onto the *input grid itself* (one ITK
resample through physical space, which undoes reorientation and spacing together). When the input
already has the model's orientation and spacing, both steps are skipped, so the round trip is exact
(no interpolation at all); otherwise probabilities and maps are linearly interpolated and label maps
taken nearest-neighbour.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from .image import Geometry, Image, ImageError

NORMALISATIONS = ("zscore", "zscore_nonzero", "percentile_zscore", "none")
_SPACING_TOLERANCE = 1e-3  # relative; below this an input is taken to be at the model spacing


@dataclass
class Prepared:
    """A case in the model frame.

    ``array``: (M, D, H, W) float32, normalised. ``input_geometry``: the grid results return to.
    ``frame``: the model-frame grid before cropping. ``crop``: (start, stop) per numpy axis of the
    crop inside ``frame``. ``notices``: what was done that a user should know.
    """

    array: np.ndarray
    input_geometry: Geometry
    frame: Geometry
    crop: tuple[tuple[int, int], ...]
    resampled: bool
    notices: list[str] = field(default_factory=list)

    def to_input_grid(self, channels: np.ndarray, fill: np.ndarray | float = 0.0,
                      interpolation: str = "linear") -> np.ndarray:
        """(K, d, h, w) in the cropped model frame -> (K, D, H, W) on the input grid.

        ``fill``: value(s) outside the crop, a scalar or one per channel (e.g. background
        probability 1). ``interpolation``: linear (probabilities, maps) or nearest (label maps).
        """
        k = channels.shape[0]
        full_shape = (k,) + tuple(reversed(self.frame.size))
        if channels.shape == full_shape:
            full = channels
        else:
            fills = np.broadcast_to(np.asarray(fill, dtype=channels.dtype), (k,))
            full = np.empty(full_shape, dtype=channels.dtype)
            full[:] = fills[:, None, None, None]
            full[(slice(None),) + tuple(slice(a, b) for a, b in self.crop)] = channels
        if not self.resampled:
            return full
        source = Image(full, self.frame).to_sitk()
        reference = sitk.Image(list(self.input_geometry.size), sitk.sitkUInt8)
        reference.SetSpacing(self.input_geometry.spacing)
        reference.SetOrigin(self.input_geometry.origin)
        reference.SetDirection(self.input_geometry.direction)
        interp = sitk.sitkNearestNeighbor if interpolation == "nearest" else sitk.sitkLinear
        out = sitk.Resample(source, reference, sitk.Transform(), interp, 0.0)
        arr = sitk.GetArrayFromImage(out)
        return np.moveaxis(arr, -1, 0) if arr.ndim == 4 else arr[None]


def align_modalities(images: list[Image], names: list[str] | None = None) -> tuple[list[Image], list[str]]:
    """Put every modality on the first one's grid.

    Same grid: unchanged. Different grid but overlapping in space: linearly resampled onto the
    first, with a notice. No overlap: :class:`ImageError`.
    """
    names = names or [f"modality {i}" for i in range(len(images))]
    ref = images[0].geometry
    aligned, notices = [images[0]], []
    for img, name in zip(images[1:], names[1:]):
        if img.geometry.same_grid(ref):
            aligned.append(img)
            continue
        if not _boxes_overlap(img.geometry, ref):
            raise ImageError(
                f"{name} does not overlap {names[0]} in physical space; the modalities must show the "
                "same anatomy — check that they belong to the same case and are registered"
            )
        ref_img = sitk.Image(list(ref.size), sitk.sitkFloat32)
        ref_img.SetSpacing(ref.spacing)
        ref_img.SetOrigin(ref.origin)
        ref_img.SetDirection(ref.direction)
        moved = sitk.Resample(img.to_sitk(), ref_img, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        aligned.append(Image.from_sitk(moved))
        notices.append(f"{name} had a different grid from {names[0]} and was resampled onto it")
    return aligned, notices


def _boxes_overlap(a: Geometry, b: Geometry) -> bool:
    ca, cb = a.corners_lps(), b.corners_lps()
    return bool(np.all(ca.min(0) <= cb.max(0)) and np.all(cb.min(0) <= ca.max(0)))


def _clean_non_finite(array: np.ndarray, name: str, notices: list[str]) -> np.ndarray:
    finite = np.isfinite(array)
    if finite.all():
        return array
    if not finite.any():
        raise ImageError(f"{name} holds no finite voxel (all NaN/Inf); the file is broken")
    bad = int((~finite).sum())
    array = np.where(finite, array, np.min(array[finite]))
    notices.append(f"{name}: {bad} NaN/Inf voxels replaced by the image minimum")
    return array


def normalise(array: np.ndarray, method: str) -> np.ndarray:
    """Per-modality intensity normalisation of a (D, H, W) array, as the model card says.

    zscore: (x - mean) / std over all voxels; zscore_nonzero: statistics over non-zero voxels, zero
    stays zero (skull-stripped MRI, BraTS); percentile_zscore: clip to the 0.5-99.5 percentiles first
    (CT, bright outliers); none: as stored. A constant image maps to zeros.
    """
    array = array.astype(np.float32, copy=False)
    if method == "none":
        return array
    if method == "percentile_zscore":
        lo, hi = np.percentile(array, [0.5, 99.5])
        array = np.clip(array, lo, hi)
        method = "zscore"
    if method == "zscore":
        std = float(array.std())
        return (array - float(array.mean())) / std if std > 0 else np.zeros_like(array)
    if method == "zscore_nonzero":
        mask = array != 0
        if not mask.any():
            return array
        values = array[mask]
        std = float(values.std()) or 1.0
        out = np.zeros_like(array)
        out[mask] = (values - float(values.mean())) / std
        return out
    raise ImageError(f"unknown normalisation {method!r} in the model card; known: {', '.join(NORMALISATIONS)}")


def _orient_and_resample(img: sitk.Image, orientation: str | None, spacing) -> sitk.Image:
    if orientation:
        img = sitk.DICOMOrient(img, orientation)
    if spacing is not None and not np.allclose(img.GetSpacing(), spacing, rtol=_SPACING_TOLERANCE):
        size = [max(1, int(round(n * s / t))) for n, s, t in zip(img.GetSize(), img.GetSpacing(), spacing)]
        img = sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), tuple(spacing),
                            img.GetDirection(), 0.0, sitk.sitkFloat32)
    return img


def needs_resampling(geometry: Geometry, orientation: str | None, spacing) -> bool:
    """True when the input's orientation or spacing differs from the model's."""
    if orientation and sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(geometry.direction) != orientation:
        return True
    return spacing is not None and not np.allclose(geometry.spacing, spacing, rtol=_SPACING_TOLERANCE)


def nonzero_box(array: np.ndarray) -> tuple[tuple[int, int], ...]:
    """(start, stop) per spatial axis of the box holding every non-zero voxel of (M, D, H, W)."""
    mask = np.any(array != 0, axis=0)
    if not mask.any():
        return tuple((0, s) for s in mask.shape)
    box = []
    for axis in range(3):
        nz = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append((int(nz[0]), int(nz[-1]) + 1))
    return tuple(box)


def to_model_frame(images: list[Image], modalities: list[dict], spacing_xyz_mm=None,
                   orientation: str | None = None, crop_to_nonzero: bool = False) -> Prepared:
    """(list of M 3D images, card modalities) -> :class:`Prepared` with a (M, D, H, W) array.

    ``modalities``: the card's list of dicts with ``name`` and ``normalization``.
    """
    if len(images) != len(modalities):
        expected = ", ".join(m["name"] for m in modalities)
        raise ImageError(
            f"the model expects {len(modalities)} modalit{'y' if len(modalities) == 1 else 'ies'} "
            f"({expected}) but {len(images)} image(s) were given; pass one --input per modality in that order"
        )
    names = [m["name"] for m in modalities]
    images, notices = align_modalities(images, names)
    input_geometry = images[0].geometry
    resampled = needs_resampling(input_geometry, orientation, spacing_xyz_mm)
    arrays = []
    for img, mod in zip(images, modalities):
        arr = _clean_non_finite(img.array.astype(np.float32, copy=False), mod["name"], notices)
        if float(arr.max()) == float(arr.min()):
            notices.append(f"{mod['name']} is constant ({float(arr.min())}); the prediction will be meaningless")
        if resampled:
            moved = _orient_and_resample(img.with_array(arr).to_sitk(), orientation, spacing_xyz_mm)
            frame = Image.from_sitk(moved).geometry
            arr = sitk.GetArrayFromImage(moved)
        else:
            frame = input_geometry
        arrays.append(arr)
    if resampled:
        notices.append(
            f"resampled from spacing {tuple(round(s, 3) for s in input_geometry.spacing)} mm to the model's "
            f"{tuple(spacing_xyz_mm) if spacing_xyz_mm else 'native'} mm, orientation {orientation or 'as input'}"
        )
    stacked = np.stack(arrays)
    crop = nonzero_box(stacked) if crop_to_nonzero else tuple((0, s) for s in stacked.shape[1:])
    stacked = stacked[(slice(None),) + tuple(slice(a, b) for a, b in crop)]
    normalised = np.stack([normalise(a, m.get("normalization", "zscore")) for a, m in zip(stacked, modalities)])
    return Prepared(normalised, input_geometry, frame, crop, resampled, notices)
