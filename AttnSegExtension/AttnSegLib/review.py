"""Doubtful regions: connected components of high difficulty, ranked for review.

A clinician reviews the worst first: regions are ranked by their *doubt mass*, the sum of difficulty
over the region times the voxel volume (ml), so a large, very uncertain region outranks a speck.
Connected components use 26-connectivity (SimpleITK ``ConnectedComponent``, fully connected).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .image import Image


@dataclass(frozen=True)
class Region:
    rank: int
    centroid_lps: tuple[float, float, float]
    centroid_ijk: tuple[int, int, int]
    volume_ml: float
    mean_difficulty: float
    max_difficulty: float
    doubt_mass: float
    bbox_ijk: tuple[tuple[int, int], ...]  # (start, stop) per axis i, j, k

    @property
    def centroid_ras(self) -> tuple[float, float, float]:
        x, y, z = self.centroid_lps
        return (-x, -y, z)


def doubtful_regions(difficulty: Image, threshold: float = 0.5, min_volume_ml: float = 0.0,
                     max_regions: int = 50) -> list[Region]:
    """Regions where ``difficulty`` (D, H, W) >= ``threshold``, best-first by doubt mass."""
    mask = difficulty.array >= threshold
    if not mask.any():
        return []
    mask_img = Image(mask.astype(np.uint8), difficulty.geometry).to_sitk()
    components = sitk.ConnectedComponent(mask_img, True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(components)
    intensity = sitk.LabelIntensityStatisticsImageFilter()
    intensity.Execute(components, difficulty.with_array(difficulty.array.astype(np.float32)).to_sitk())
    voxel_ml = difficulty.geometry.voxel_volume_ml
    found = []
    for label in stats.GetLabels():
        volume = stats.GetNumberOfPixels(label) * voxel_ml
        if volume < min_volume_ml:
            continue
        mean = intensity.GetMean(label)
        start, size = stats.GetBoundingBox(label)[:3], stats.GetBoundingBox(label)[3:]
        centroid = stats.GetCentroid(label)
        found.append((mean * volume, label, volume, mean, intensity.GetMaximum(label), centroid, start, size))
    found.sort(key=lambda f: -f[0])
    regions = []
    for rank, (mass, label, volume, mean, peak, centroid, start, size) in enumerate(found[:max_regions]):
        ijk = components.TransformPhysicalPointToIndex(centroid)
        regions.append(Region(rank, tuple(centroid), tuple(int(v) for v in ijk), round(volume, 5),
                              float(mean), float(peak), float(mass),
                              tuple((int(s), int(s + n)) for s, n in zip(start, size))))
    return regions
