"""Bring input volumes into a model's frame, and bring predictions back, exactly.

Forward (:func:`to_model_frame`): check and align modalities -> reorient to the card's orientation ->
resample to the card's spacing (its size and memory estimated first) -> optional crop to the non-zero
box -> per-modality normalisation, robust to outliers (:mod:`.intensity`), with notices where an input
looks unlike the training cases.
Inverse (:meth:`Prepared.to_input_grid`): un-crop -> resample onto the *input grid itself* (one ITK
resample through physical space, which undoes reorientation and spacing together). When the input
already has the model's orientation and spacing, both steps are skipped, so the round trip is exact
(no interpolation at all); otherwise probabilities and maps are linearly interpolated and label maps
taken nearest-neighbour. Both ways, a sample that falls (by up to two voxels) beyond the last voxel
centre gets the edge value rather than 0, continuously: rounding noise in the geometry cannot switch
an edge slab between tissue and zero, and no input voxel is left with probabilities that sum to 0.
"""
from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .image import Geometry, Image, ImageError, physical_memory_bytes
from .intensity import (MASKED_BACKGROUND_FRACTION, Profile, clip_and_standardise, input_notices, roughness, sample,
                        tissue_mask)

NORMALISATIONS = ("zscore", "zscore_nonzero", "percentile_zscore", "none")
_SPACING_TOLERANCE = 1e-3  # relative; below this an input is taken to be at the model spacing
_EDGE_PAD_VOXELS = 2  # grids of the same extent overhang each other's last voxel centre by < 2 voxels
_MAX_RESOLUTION_RATIO = 20.0  # input voxels this many times finer or coarser than the model's: wrong units
_MIN_COVERAGE = 0.95  # a modality covering less of the first one's field of view gets a notice
_COVERAGE_SAMPLES = 100_000


@dataclass
class Prepared:
    """A case in the model frame.

    ``array``: (M, D, H, W) float32, normalised. ``input_geometry``: the grid results return to.
    ``frame``: the model-frame grid before cropping. ``crop``: (start, stop) per numpy axis of the
    crop inside ``frame``. ``notices``: what was done that a user should know. ``profiles``: each
    modality's intensity :class:`~.intensity.Profile` (None where it is not normalised).
    """

    array: np.ndarray
    input_geometry: Geometry
    frame: Geometry
    crop: tuple[tuple[int, int], ...]
    resampled: bool
    notices: list[str] = field(default_factory=list)
    profiles: list[Profile | None] = field(default_factory=list)

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
        reference = sitk.Image(list(self.input_geometry.size), sitk.sitkUInt8)
        reference.SetSpacing(self.input_geometry.spacing)
        reference.SetOrigin(self.input_geometry.origin)
        reference.SetDirection(self.input_geometry.direction)
        interp = sitk.sitkNearestNeighbor if interpolation == "nearest" else sitk.sitkLinear
        out = np.empty((k,) + tuple(reversed(self.input_geometry.size)), dtype=channels.dtype)
        for index, channel in enumerate(full):  # one channel at a time keeps the scratch to one volume
            moved = sitk.Resample(_edge_padded(Image(channel, self.frame).to_sitk()), reference, sitk.Transform(),
                                  interp, 0.0)
            out[index] = sitk.GetArrayViewFromImage(moved)
        return out


def align_modalities(images: list[Image], names: list[str] | None = None) -> tuple[list[Image], list[str]]:
    """Put every modality on the first one's grid.

    Same grid: unchanged. Different grid but overlapping in space: linearly resampled onto the
    first, with a notice, which also says when it covers only part of the first one's field of view
    (the model sees zeros beyond it). No overlap: :class:`ImageError`.
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
        covered = _coverage(img.geometry, ref)
        if covered < _MIN_COVERAGE:
            notices.append(_partial_notice(name, names[0], covered))
    return aligned, notices


def _partial_notice(name: str, reference: str, covered: float) -> str:
    return (f"{name} covers only {covered:.0%} of {reference}'s field of view; the model sees zeros beyond it, so "
            "the segmentation there is unreliable — give images of the same region")


def _tissue_coverage_notices(images: list[Image], names: list[str], notices: list[str]) -> list[str]:
    """A notice for each modality (on the first one's grid) whose image data covers only part of the
    first one's tissue (:func:`.intensity.tissue_mask`): a scan of part of the region padded with its
    background value onto the same grid; none where the grid check already said so."""
    reference = sample(tissue_mask(images[0].array))
    found = []
    for img, name in zip(images[1:], names[1:]):
        if any(n.startswith(f"{name} covers only") for n in notices) or not reference.any():
            continue
        covered = float((sample(tissue_mask(img.array)) & reference).sum() / reference.sum())
        if covered < _MIN_COVERAGE:
            found.append(_partial_notice(name, names[0], covered))
    return found


def _coverage(geometry: Geometry, reference: Geometry) -> float:
    """Fraction of ``reference``'s voxel centres inside ``geometry``'s field of view (half a voxel
    beyond its edge voxels' centres)."""
    step = max(1, math.ceil((math.prod(reference.size) / _COVERAGE_SAMPLES) ** (1 / 3)))  # a lattice is enough
    axes = [np.arange(n, dtype=float)[::step] for n in reference.size]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    lps = ijk @ reference.ijk_to_lps()[:3, :3].T + reference.ijk_to_lps()[:3, 3]
    inside = np.linalg.solve(geometry.ijk_to_lps()[:3, :3], (lps - geometry.origin).T).T
    size = np.asarray(geometry.size, dtype=float)
    return float(np.mean(np.all((inside >= -0.5) & (inside <= size - 0.5), axis=1)))


def _boxes_overlap(a: Geometry, b: Geometry) -> bool:
    ca, cb = a.corners_lps(), b.corners_lps()
    return bool(np.all(ca.min(0) <= cb.max(0)) and np.all(cb.min(0) <= ca.max(0)))


def _clean_in_place(channel: np.ndarray, name: str, notices: list[str]) -> None:
    """Replace NaN/Inf voxels of a float32 (D, H, W) channel by its finite minimum; note a constant image."""
    finite = np.isfinite(channel)
    if not finite.all():
        if not finite.any():
            raise ImageError(f"{name} holds no finite voxel (all NaN/Inf); the file is broken — export it again")
        bad = int(finite.size - np.count_nonzero(finite))
        channel[~finite] = np.min(channel, where=finite, initial=np.inf)
        notices.append(f"{name}: {bad} NaN/Inf voxels replaced by the image minimum")
    if float(channel.max()) == float(channel.min()):
        notices.append(f"{name} is constant ({float(channel.min())}); the prediction will be meaningless")


def normalise(array: np.ndarray, method: str) -> np.ndarray:
    """Per-modality intensity normalisation of a (D, H, W) array, as the model card says.

    zscore: clip outliers (beyond the 0.5-99.5th percentiles widened by their range, see
    :func:`.intensity.clip_and_standardise`), then (x - mean) / std, over all voxels; zscore_nonzero:
    the same over the non-zero voxels, zero stays zero (skull-stripped MRI, BraTS); percentile_zscore:
    read as zscore, which now clips too; none: as stored. A constant image maps to zeros.
    """
    out = np.array(array, dtype=np.float32)
    normalise_in_place(out, method)
    return out


def normalise_in_place(array: np.ndarray, method: str) -> Profile | None:
    """:func:`normalise` overwriting a float32 array (no full-size copy beyond one temporary);
    -> the intensity profile of the voxels it normalised (None for ``none`` or no non-zero voxel), with
    the (D, H, W) array's roughness (:func:`.intensity.roughness`)."""
    if method == "none":
        return None
    tissue = tissue_mask(array) if array.ndim == 3 else None
    profile = _normalise_and_profile(array, method)
    if profile is None or tissue is None:
        return profile
    return dataclasses.replace(profile, roughness=roughness(array, tissue))


def _normalise_and_profile(array: np.ndarray, method: str) -> Profile | None:
    if method in ("zscore", "percentile_zscore"):
        background = array == 0
        if background.mean() <= MASKED_BACKGROUND_FRACTION:
            return clip_and_standardise(array)
        # A brain-extracted or padded scan: its exact zeros are no tissue, and nor is the rim of voxels
        # touching them (partial volume of tissue and zero, interpolated when a crop was resampled), so
        # the profile the notices compare with the training cases' (crops of whole scans, no zeros) is
        # measured on the rest. With the rim, a localised crop of the MNI152 template was flagged (its
        # 1st percentile -3.26 z, -2.85 without).
        tissue = array[~ndimage.binary_dilation(background)]
        profile = clip_and_standardise(array)
        if not tissue.size:  # zeros and their rim everywhere (a blank image): no tissue to profile apart
            return profile
        return dataclasses.replace(profile, quantiles=clip_and_standardise(tissue).quantiles)
    if method == "zscore_nonzero":
        mask = array != 0
        if not mask.any():
            return None
        values = array[mask]
        profile = clip_and_standardise(values)
        array[mask] = values
        return profile
    raise ImageError(f"unknown normalisation {method!r} in the model card; known: {', '.join(NORMALISATIONS)}")


# Thick slices: patient 07's T1 resampled to 5 mm axial slices gave 1.85 / 1.60 ml per side against 2.74 /
# 2.89 from its 1 mm scan (5 mm coronal: 2.49 / 2.00; 3 mm axial: 2.50 / 2.72), the sample crop at 5 mm
# 1.31 / 1.32 against 1.39 / 1.71 ml; 2 mm or finer stayed within a few percent.
COARSE_VOXEL_RATIO = 2.0


def check_spacing_units(geometry: Geometry, spacing) -> None:
    """Refuse an input whose voxels are implausibly finer or coarser than the model's (x, y, z)
    ``spacing`` mm: a header in the wrong units. Checked before anything resamples it, localisation's
    registration included."""
    source, target = np.asarray(geometry.spacing, dtype=float), np.asarray(spacing, dtype=float)
    ratio = max(source.max() / target.min(), target.max() / source.min())
    if ratio > _MAX_RESOLUTION_RATIO:
        raise ImageError(f"the image's voxels ({', '.join(f'{v:.3g}' for v in source)} mm) are {ratio:.3g} times "
                         f"finer or coarser than the model's ({', '.join(f'{v:.3g}' for v in target)} mm); the "
                         "header's spacing is probably in the wrong units (mm expected) — fix the header")


def coarse_voxel_notices(geometry: Geometry, spacing) -> list[str]:
    """A notice when the input's voxels are more than :data:`COARSE_VOXEL_RATIO` times the model's (x, y, z)
    ``spacing`` mm along some axis (thick slices): what lies between two slices is interpolated, not seen."""
    source, target = np.asarray(geometry.spacing, dtype=float), np.asarray(spacing, dtype=float)
    coarsest = float(source.max() / target.min())
    if coarsest <= COARSE_VOXEL_RATIO:
        return []
    return [f"the image's voxels ({', '.join(f'{v:.3g}' for v in source)} mm) are {coarsest:.3g} times the model's "
            f"({', '.join(f'{v:.3g}' for v in target)} mm) along one axis: a structure between thick slices is "
            "interpolated, so its volume is unreliable — give a 3D scan with voxels near the model's"]


def check_model_frame_size(geometry: Geometry, spacing, channels: int) -> None:
    """Refuse, before anything is allocated, an input whose voxels are implausibly finer or coarser
    than the model's (a header in the wrong units) or whose model-frame copy cannot fit in memory.

    ``spacing``: the model's (x, y, z) mm; ``channels``: the modalities. The model frame holds about
    the input's physical volume over the model's voxel volume (whatever the reorientation).
    """
    check_spacing_units(geometry, spacing)
    source, target = np.asarray(geometry.spacing, dtype=float), np.asarray(spacing, dtype=float)
    voxels = math.prod(float(n) * s / t for n, s, t in zip(geometry.size, source, target))
    needed = voxels * 4 * (channels + 1) + math.prod(geometry.size) * 4 * channels
    if needed > physical_memory_bytes():
        raise ImageError(f"resampling the image to the model's {', '.join(f'{v:.3g}' for v in target)} mm voxels "
                         f"makes a grid of {voxels:.3g} voxels needing {needed / 2**30:.1f} GiB, more than this "
                         f"machine's {physical_memory_bytes() / 2**30:.1f} GiB of memory; crop the image, or check "
                         "the header's spacing")


def _orient_and_resample(img: sitk.Image, orientation: str | None, spacing) -> tuple[sitk.Image, bool]:
    """-> (the image in the model's orientation and spacing, whether its voxels were interpolated)."""
    if orientation:
        img = sitk.DICOMOrient(img, orientation)
    if spacing is None or np.allclose(img.GetSpacing(), spacing, rtol=_SPACING_TOLERANCE):
        return img, False
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(img.GetSize(), img.GetSpacing(), spacing)]
    try:
        return sitk.Resample(_edge_padded(img), size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                             tuple(spacing), img.GetDirection(), 0.0, sitk.sitkFloat32), True
    except RuntimeError as err:
        if "allocate" not in str(err):
            raise
        raise MemoryError(f"out of memory resampling to a {'x'.join(map(str, size))} grid; close other programs "
                          "or crop the volume") from None


def _edge_padded(img: sitk.Image, voxels: int = _EDGE_PAD_VOXELS) -> sitk.Image:
    """``img`` with its edge voxels repeated ``voxels`` times on every side, in place in space: linear
    interpolation then reaches samples up to that far beyond the last voxel centre, continuously
    (ITK would return the default value there, or its nearest-neighbour extrapolation, which rounds
    every axis and so jumps where the sample sits half-way between voxels)."""
    return sitk.ZeroFluxNeumannPad(img, [voxels] * 3, [voxels] * 3)


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
                   orientation: str | None = None, crop_to_nonzero: bool = False,
                   statistics: dict | None = None) -> Prepared:
    """(list of M 3D images, card modalities) -> :class:`Prepared` with a (M, D, H, W) array.

    ``modalities``: the card's list of dicts with ``name`` and ``normalization``. ``statistics``: the
    card's ``input_statistics``, against which each modality's intensities are checked (notices).
    """
    if len(images) != len(modalities):
        expected = ", ".join(m["name"] for m in modalities)
        raise ImageError(
            f"the model expects {len(modalities)} modalit{'y' if len(modalities) == 1 else 'ies'} "
            f"({expected}) but {len(images)} image(s) were given; pass one --input per modality in that order"
        )
    names = [m["name"] for m in modalities]
    images, notices = align_modalities(images, names)
    notices += _duplicate_notices(images, names)
    notices += _tissue_coverage_notices(images, names, notices)
    input_geometry = frame = images[0].geometry
    resampled = needs_resampling(input_geometry, orientation, spacing_xyz_mm)
    if resampled and spacing_xyz_mm is not None:
        check_model_frame_size(input_geometry, spacing_xyz_mm, len(images))
    # Memory: one float32 (M, D, H, W) copy of the input, worked on in place; when resampling, one
    # more in the model frame (the input-grid copy is freed once every channel has moved).
    stacked = np.empty((len(images),) + images[0].array.shape, dtype=np.float32)
    for channel, img, name in zip(stacked, images, names):
        channel[...] = img.array
        _clean_in_place(channel, name, notices)
    if resampled:
        moved_channels = None
        for index, channel in enumerate(stacked):
            moved, interpolated = _orient_and_resample(Image(channel, input_geometry).to_sitk(), orientation,
                                                       spacing_xyz_mm)
            if moved_channels is None:
                frame = Geometry.from_sitk(moved)
                moved_channels = np.empty((len(images),) + tuple(reversed(frame.size)), dtype=np.float32)
            moved_channels[index] = sitk.GetArrayViewFromImage(moved)
        stacked = moved_channels
        notices.append(_resampling_notice(input_geometry, frame, orientation, interpolated))
    crop = nonzero_box(stacked) if crop_to_nonzero else tuple((0, s) for s in stacked.shape[1:])
    if crop_to_nonzero:
        stacked = stacked[(slice(None),) + tuple(slice(a, b) for a, b in crop)].copy()
    profiles = [normalise_in_place(channel, mod.get("normalization", "zscore"))
                for channel, mod in zip(stacked, modalities)]
    notices += input_notices(profiles, names, statistics)
    return Prepared(stacked, input_geometry, frame, crop, resampled, notices, profiles)


_DUPLICATE_CORRELATION = 0.995  # two contrasts of one case correlate less inside the tissue: 0.25-0.59 for the
                                # BraTS sample's FLAIR and T1c, 0.96 for the MS data's T1 and T1 post-contrast


def _duplicate_notices(images: list[Image], names: list[str]) -> list[str]:
    """A notice for each modality given as the same image as an earlier one, or as a copy of it rescaled
    or stored in another type (their tissue voxels correlate almost perfectly); the grids already agree."""
    notices = []
    for later in range(1, len(images)):
        for earlier in range(later):
            if np.array_equal(images[later].array, images[earlier].array):
                notices.append(f"{names[later]} is the same image as {names[earlier]}; the model needs a different "
                               f"image per modality — give the {names[later]} file")
                break
            correlation = _tissue_correlation(images[later].array, images[earlier].array)
            if correlation > _DUPLICATE_CORRELATION:
                notices.append(f"{names[later]} looks like a copy of {names[earlier]} (their voxels correlate "
                               f"{correlation:.4f}); the model needs a different image per modality — give the "
                               f"{names[later]} file")
                break
    return notices


def _tissue_correlation(first: np.ndarray, second: np.ndarray) -> float:
    """Pearson correlation of two (D, H, W) arrays over the voxels that are tissue in both
    (:func:`.intensity.tissue_mask`), on an evenly strided sample of at most ~4 M voxels; 0 when
    either is constant there."""
    a, b = sample(first), sample(second)
    both = sample(tissue_mask(first)) & sample(tissue_mask(second))
    a, b = a[both].astype(np.float64), b[both].astype(np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _resampling_notice(source: Geometry, frame: Geometry, orientation: str | None, interpolated: bool) -> str:
    orient = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines
    changes = []
    if orientation and orient(source.direction) != orientation:
        changes.append(f"reoriented from {orient(source.direction)} to the model's {orientation}")
    if interpolated:
        changes.append(f"resampled from {tuple(round(s, 3) for s in source.spacing)} mm voxels to the model's "
                       f"{tuple(round(s, 3) for s in frame.spacing)} mm")
    return "; ".join(changes) + "; results are brought back to the input grid"
