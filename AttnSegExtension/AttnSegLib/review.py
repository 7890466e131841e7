"""Doubtful regions: where the review map (the card's ``inference.review_map``, uncertainty by
default) is high, cut into compact places a reader can visit one by one, most doubtful first.

* **Fragments.** Voxels at or above the threshold are grown by half of ``merge_mm`` (a binary
  dilation with a box of that radius, rounded up to whole voxels, on each axis) and the grown mask is
  labelled with 26-connectivity (SimpleITK ``ConnectedComponent``, fully connected); each doubtful
  voxel takes the label of its grown component. Fragments with a gap of at most ``merge_mm`` between
  them, such as the one-voxel slivers along a boundary, are one *group*.
* **Compact regions.** A group is cut into places no wider than ``2 * radius_mm``: the *local doubt*
  of a voxel is the map over the doubtful voxels smoothed with a Gaussian of sigma ``DOUBT_SIGMA_MM``.
  The doubtful voxel of highest local doubt that no centre covers yet becomes a centre and covers
  the voxels of its group within ``radius_mm`` of it, until every doubtful voxel is covered; each
  voxel then belongs to the nearest centre of its group (at most ``radius_mm`` away). A band of
  doubt around a whole structure becomes a string of regions along it, each centred where the doubt
  is densest. ``radius_mm=None`` leaves every group whole.
* **Size.** Regions under ``min_volume_ml`` are left out; every other region is returned (no cap).
* **Ranking.** By *doubt mass*, the sum of the map over the region times the voxel volume (ml), so a
  large, very uncertain region outranks a speck.
* **Marker.** The region's centre (or, for a whole group, its voxel of highest local doubt): a
  doubtful voxel of the region, unlike the centre of mass of a curved region.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .image import Image

MERGE_MM = 2.0  # doubtful fragments with a gap of at most this (mm) are one group
RADIUS_MM = 7.5  # a region holds the doubtful voxels within this (mm) of its centre: at most 15 mm across
DOUBT_SIGMA_MM = 2.0  # the scale (mm) of the local doubt that places the centres
MIN_VOLUME_ML = 0.005  # smaller regions are left out of the review (5 voxels of 1 mm)
EDIT_MARGIN_MM = 2.0  # "edit only doubtful voxels" also lets the user edit this far (mm) around them


@dataclass(frozen=True)
class Region:
    """One region of the review. ``mean_value`` and ``peak_value`` are the mean and peak of the review
    map (the run's ``review_map_name``, e.g. ``uncertainty``) over the region's voxels."""
    rank: int
    marker_lps: tuple[float, float, float]  # centre of the marker voxel, world LPS (mm)
    marker_ijk: tuple[int, int, int]  # the marker voxel, (i, j, k)
    voxels: int
    volume_ml: float
    mean_value: float
    peak_value: float
    doubt_mass: float
    bbox_ijk: tuple[tuple[int, int], ...]  # (start, stop) per axis i, j, k

    @property
    def marker_ras(self) -> tuple[float, float, float]:
        x, y, z = self.marker_lps
        return (-x, -y, z)


def fragment_groups(review_map: Image, threshold: float = 0.5, merge_mm: float = MERGE_MM) -> np.ndarray:
    """(D, H, W) int array: 0 where ``review_map`` < ``threshold``, else the (unranked) group label of
    the voxel, fragments less than ``merge_mm`` apart sharing one label."""
    mask = (review_map.array >= threshold).astype(np.uint8)
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    mask_img = Image(mask, review_map.geometry).to_sitk()
    grown = mask_img
    radius = [math.ceil(merge_mm / 2 / s - 1e-6) for s in review_map.geometry.spacing]
    if any(radius):
        grown = sitk.BinaryDilate(mask_img, radius, sitk.sitkBox, 0, 1)
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(grown, True))
    return np.where(mask > 0, components, 0).astype(np.int32)


def _local_doubt(review_map: Image, doubtful: np.ndarray) -> np.ndarray:
    """(D, H, W) float32: the map over the ``doubtful`` voxels, smoothed (sigma ``DOUBT_SIGMA_MM``)."""
    masked = Image(np.where(doubtful, review_map.array, 0).astype(np.float32), review_map.geometry).to_sitk()
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(masked, DOUBT_SIGMA_MM))


class _Balls:
    """Voxels of one group within ``radius_mm`` of a centre, looked at in a box around the centre."""

    def __init__(self, groups: np.ndarray, spacing_dhw: tuple[float, float, float], radius_mm: float | None):
        self.groups = groups
        self.spacing = np.asarray(spacing_dhw, float)
        self.radius2 = math.inf if radius_mm is None else radius_mm ** 2
        shape = np.asarray(groups.shape)
        self.half = shape if radius_mm is None else np.minimum(
            np.floor(radius_mm / self.spacing + 1e-9).astype(int), shape)

    def around(self, centre: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
        """The box around ``centre`` (k, j, i indices), the squared distances (mm²) in it, and which
        voxels of the box belong to the ball (same group, within the radius)."""
        box = tuple(slice(max(c - h, 0), min(c + h + 1, n)) for c, h, n in zip(centre, self.half, self.groups.shape))
        offsets = np.ogrid[box]
        distance2 = sum(((o - c) * s) ** 2 for o, c, s in zip(offsets, centre, self.spacing))
        inside = (self.groups[box] == self.groups[tuple(centre)]) & (distance2 <= self.radius2)
        return box, distance2, inside


def _cut(groups: np.ndarray, local_doubt: np.ndarray, balls: _Balls) -> tuple[np.ndarray, list[np.ndarray]]:
    """Cut the groups into the balls of greedy centres (module docstring): the (D, H, W) int32 label
    of each voxel's centre (1-based, 0 outside the groups) and the centres as (k, j, i) arrays."""
    points = np.argwhere(groups > 0)
    points = points[np.argsort(-local_doubt[groups > 0], kind="stable")]
    covered = np.zeros(groups.shape, bool)
    centres = []
    for start in range(0, len(points), 4096):  # skip covered candidates a chunk at a time
        chunk = points[start:start + 4096]
        for point in chunk[~covered[tuple(chunk.T)]]:
            if covered[tuple(point)]:
                continue
            centres.append(point)
            box, _, inside = balls.around(point)
            covered[box] |= inside
    owner = np.zeros(groups.shape, np.int32)
    nearest = np.full(groups.shape, np.inf, np.float32)
    for label, centre in enumerate(centres, 1):
        box, distance2, inside = balls.around(centre)
        closer = inside & (distance2 < nearest[box])
        nearest[box][closer] = distance2[closer]
        owner[box][closer] = label
    return owner, centres


def region_labels(review_map: Image, threshold: float = 0.5, min_volume_ml: float = MIN_VOLUME_ML,
                  merge_mm: float = MERGE_MM, radius_mm: float | None = RADIUS_MM) -> tuple[np.ndarray, list[Region]]:
    """The review's regions (module docstring) of ``review_map`` (D, H, W): a (D, H, W) int32 array
    holding ``rank + 1`` on each region's voxels (0 elsewhere, left-out specks included), and the
    regions best-first."""
    groups = fragment_groups(review_map, threshold, merge_mm)
    if not groups.any():
        return np.zeros(groups.shape, np.int32), []
    geometry = review_map.geometry
    balls = _Balls(groups, geometry.spacing[::-1], radius_mm)
    owner, centres = _cut(groups, _local_doubt(review_map, groups > 0), balls)
    values = review_map.array.astype(np.float64)
    voxel_ml = geometry.voxel_volume_ml
    counts = np.bincount(owner.ravel(), minlength=len(centres) + 1)
    sums = np.bincount(owner.ravel(), weights=values.ravel(), minlength=len(centres) + 1)
    flat = np.flatnonzero(owner)
    flat = flat[np.argsort(owner.ravel()[flat], kind="stable")]  # each region's voxels are one run
    starts = np.cumsum(counts) - counts
    found = []
    for label, centre in enumerate(centres, 1):
        if counts[label] * voxel_ml < min_volume_ml:
            continue
        members = flat[starts[label] - counts[0]:starts[label] - counts[0] + counts[label]]
        found.append((sums[label] * voxel_ml, centre, *np.unravel_index(members, owner.shape)))
    found.sort(key=lambda f: -f[0])
    labels = np.zeros(groups.shape, np.int32)
    regions = []
    for rank, (mass, (k, j, i), kk, jj, ii) in enumerate(found):
        labels[kk, jj, ii] = rank + 1
        region_values = values[kk, jj, ii]
        marker_ijk = (int(i), int(j), int(k))
        marker_lps = tuple(float(v) for v in (geometry.ijk_to_lps() @ [*marker_ijk, 1.0])[:3])
        bbox = tuple((int(a.min()), int(a.max()) + 1) for a in (ii, jj, kk))
        regions.append(Region(rank, marker_lps, marker_ijk, len(kk), round(len(kk) * voxel_ml, 5),
                              float(region_values.mean()), float(region_values.max()), float(mass), bbox))
    return labels, regions


def editable_mask(review_map: Image, threshold: float = 0.5, margin_mm: float = EDIT_MARGIN_MM) -> np.ndarray:
    """(D, H, W) bool: where "edit only doubtful voxels" lets the user edit, the voxels of ``review_map``
    (D, H, W) at or above ``threshold`` grown by ``margin_mm`` (a binary dilation with a ball of that
    radius, rounded up to whole voxels on each axis). The doubt of a good segmenter sits on its boundary
    while its errors lie beside it; on the shipped sample the doubtful voxels alone held 41 % of the wrong
    voxels, and grown by 2 mm all of them."""
    mask = (review_map.array >= threshold).astype(np.uint8)
    radius = [math.ceil(margin_mm / s - 1e-6) for s in review_map.geometry.spacing]
    if not mask.any() or not any(radius):
        return mask > 0
    grown = sitk.BinaryDilate(Image(mask, review_map.geometry).to_sitk(), radius, sitk.sitkBall, 0, 1)
    return sitk.GetArrayFromImage(grown) > 0


def doubtful_regions(review_map: Image, threshold: float = 0.5, min_volume_ml: float = MIN_VOLUME_ML,
                     merge_mm: float = MERGE_MM, radius_mm: float | None = RADIUS_MM) -> list[Region]:
    """Every region where ``review_map`` (D, H, W) >= ``threshold`` and at least ``min_volume_ml``
    large, best-first by doubt mass (see the module docstring)."""
    return region_labels(review_map, threshold, min_volume_ml, merge_mm, radius_mm)[1]
