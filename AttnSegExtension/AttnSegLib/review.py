"""Doubtful regions: where the review map (the card's ``inference.review_map``, uncertainty by
default) is high, grouped into regions a reader can visit one by one, most doubtful first.

* **Grouping.** Voxels at or above the threshold are grown by half of ``merge_mm`` (a binary
  dilation with a box of that radius, rounded up to whole voxels, on each axis), the grown mask is
  labelled with 26-connectivity (SimpleITK ``ConnectedComponent``, fully connected), and each
  doubtful voxel takes the label of its grown component. Fragments with a gap of at most ``merge_mm``
  between them, such as the one-voxel slivers along a boundary, become one region; a region holds
  only voxels at or above the threshold.
* **Size.** Regions under ``min_volume_ml`` are left out; every region found is returned (no cap).
* **Ranking.** By *doubt mass*, the sum of the map over the region times the voxel volume (ml), so a
  large, very uncertain region outranks a speck.
* **Marker.** The region's voxel deepest inside it (largest distance, in mm, to the nearest voxel
  outside the doubtful mask), ties broken by the higher map value: a point that is always in the
  region, unlike the centre of mass of a curved region.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .image import Image

MERGE_MM = 2.0  # doubtful fragments with a gap of at most this (mm) are one region
MIN_VOLUME_ML = 0.005  # smaller regions are left out of the review (5 voxels of 1 mm)


@dataclass(frozen=True)
class Region:
    """One region of the review. ``mean_difficulty`` and ``max_difficulty`` are the mean and peak of
    the review map over the region (named so for the scenes and scripts that read them)."""
    rank: int
    marker_lps: tuple[float, float, float]  # centre of the marker voxel, world LPS (mm)
    marker_ijk: tuple[int, int, int]  # the marker voxel, (i, j, k)
    voxels: int
    volume_ml: float
    mean_difficulty: float
    max_difficulty: float
    doubt_mass: float
    bbox_ijk: tuple[tuple[int, int], ...]  # (start, stop) per axis i, j, k

    @property
    def marker_ras(self) -> tuple[float, float, float]:
        x, y, z = self.marker_lps
        return (-x, -y, z)


def region_labels(review_map: Image, threshold: float = 0.5, merge_mm: float = MERGE_MM) -> np.ndarray:
    """(D, H, W) int array: 0 where ``review_map`` < ``threshold``, else the (unranked) region label
    of the voxel, fragments less than ``merge_mm`` apart sharing one label."""
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


def doubtful_regions(review_map: Image, threshold: float = 0.5, min_volume_ml: float = MIN_VOLUME_ML,
                     merge_mm: float = MERGE_MM) -> list[Region]:
    """Every region where ``review_map`` (D, H, W) >= ``threshold`` and at least ``min_volume_ml``
    large, best-first by doubt mass (see the module docstring)."""
    labels = region_labels(review_map, threshold, merge_mm)
    if not labels.any():
        return []
    values = review_map.array.astype(np.float64)
    geometry = review_map.geometry
    inside = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        Image((labels > 0).astype(np.uint8), geometry).to_sitk(), insideIsPositive=True, squaredDistance=False,
        useImageSpacing=True, backgroundValue=0))
    kk, jj, ii = np.nonzero(labels)
    voxel_labels = labels[kk, jj, ii]
    # Sorted by label, then depth, then map value: each label's voxels are one run, its marker last.
    order = np.lexsort((values[kk, jj, ii], inside[kk, jj, ii], voxel_labels))
    ends = np.r_[np.nonzero(np.diff(voxel_labels[order]))[0] + 1, len(order)]
    voxel_ml = geometry.voxel_volume_ml
    found = []
    for start, end in zip(np.r_[0, ends[:-1]], ends):
        members = order[start:end]
        if len(members) * voxel_ml < min_volume_ml:
            continue
        region_values = values[kk[members], jj[members], ii[members]]
        marker = members[-1]
        marker_ijk = (int(ii[marker]), int(jj[marker]), int(kk[marker]))
        marker_lps = tuple(float(v) for v in (geometry.ijk_to_lps() @ [*marker_ijk, 1.0])[:3])
        bbox = tuple((int(a[members].min()), int(a[members].max()) + 1) for a in (ii, jj, kk))
        found.append((float(region_values.sum()) * voxel_ml, marker_lps, marker_ijk, len(members),
                      float(region_values.mean()), float(region_values.max()), bbox))
    found.sort(key=lambda f: -f[0])
    return [Region(rank, marker_lps, marker_ijk, count, round(count * voxel_ml, 5), mean, peak, mass, bbox)
            for rank, (mass, marker_lps, marker_ijk, count, mean, peak, bbox) in enumerate(found)]
