"""Metrics against cases worked out by hand, and doubtful-region ranking."""
from __future__ import annotations

import numpy as np
import pytest

from AttnSegLib.image import Geometry, Image
from AttnSegLib.metrics import (boundary_distance_doubt, boundary_distance_mm, calibration_bins, error_detection_auroc,
                                error_detection_average_precision, evaluate_labels, expected_calibration_error,
                                review_effort_curve, volume_to_find)
from AttnSegLib.review import doubtful_regions


def _cube(shape, start, stop, value=1):
    a = np.zeros(shape, dtype=np.uint8)
    a[tuple(slice(s, e) for s, e in zip(start, stop))] = value
    return a


def test_dice_by_hand():
    ref = _cube((10, 10, 10), (2, 2, 2), (6, 6, 6))          # 64 voxels
    pred = _cube((10, 10, 10), (2, 2, 2), (6, 6, 4))         # 32 voxels, all inside
    m = evaluate_labels(pred, ref, spacing=(1, 1, 1), labels=[1])["1"]
    assert m["dice"] == pytest.approx(2 * 32 / (64 + 32))
    assert m["reference_ml"] == pytest.approx(0.064) and m["prediction_ml"] == pytest.approx(0.032)


def test_shifted_cube_distances_in_millimetres():
    """A cube shifted by 2 voxels along one axis: every surface point of the faces perpendicular
    to that axis is 2 voxels away; with 3 mm spacing along the shift that is 6 mm."""
    ref = _cube((20, 20, 20), (5, 5, 5), (10, 10, 10))
    pred = _cube((20, 20, 20), (7, 5, 5), (12, 10, 10))      # shifted along numpy axis 0 = z
    m = evaluate_labels(pred, ref, spacing=(1.0, 1.0, 3.0), labels=[1])["1"]
    assert m["dice"] == pytest.approx(2 * 75 / 250)
    assert m["hd95_mm"] == pytest.approx(6.0)
    iso = evaluate_labels(pred, ref, spacing=(1.0, 1.0, 1.0), labels=[1])["1"]
    assert iso["hd95_mm"] == pytest.approx(2.0)
    assert 0 < iso["asd_mm"] < 2.0


def test_identical_and_empty_structures():
    ref = _cube((8, 8, 8), (2, 2, 2), (5, 5, 5))
    same = evaluate_labels(ref, ref, spacing=(1, 1, 1), labels=[1, 2])
    assert same["1"] == {"reference_ml": 0.027, "prediction_ml": 0.027, "dice": 1.0, "asd_mm": 0.0, "hd95_mm": 0.0}
    assert same["2"]["dice"] == 1.0  # absent in both: agreement
    missed = evaluate_labels(np.zeros_like(ref), ref, spacing=(1, 1, 1), labels=[1])["1"]
    assert missed["dice"] == 0.0 and missed["hd95_mm"] is None


def test_grids_must_match():
    with pytest.raises(ValueError, match="not on the same grid"):
        evaluate_labels(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), spacing=(1, 1, 1))


def test_doubtful_regions_are_ranked_by_doubt_mass():
    difficulty = np.zeros((20, 20, 20), dtype=np.float32)
    difficulty[2:4, 2:4, 2:4] = 0.9       # 8 voxels, very doubtful: mass 7.2 voxel units
    difficulty[10:16, 10:16, 10:16] = 0.6  # 216 voxels, doubtful: mass 129.6
    difficulty[18, 18, 18] = 0.4          # below threshold
    geometry = Geometry((20, 20, 20), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    regions = doubtful_regions(Image(difficulty, geometry), threshold=0.5, radius_mm=None)  # each cube whole
    assert len(regions) == 2
    big, small = regions
    assert big.rank == 0 and big.volume_ml == pytest.approx(216 * 8 / 1000)
    assert big.mean_value == pytest.approx(0.6)
    assert set(big.marker_ijk) <= {12, 13}  # one of the 8 voxels of highest local doubt: the cube's middle
    assert big.marker_lps == pytest.approx([2.0 * v for v in big.marker_ijk])
    assert big.marker_ras == pytest.approx((-big.marker_lps[0], -big.marker_lps[1], big.marker_lps[2]))
    assert big.voxels == 216
    assert big.bbox_ijk == ((10, 16), (10, 16), (10, 16))
    assert small.peak_value == pytest.approx(0.9)
    assert doubtful_regions(Image(difficulty, geometry), threshold=0.95) == []


def test_error_detection_auroc_by_hand():
    errors = np.zeros((2, 2, 2), bool)
    errors[0, 0, :] = True
    doubt = np.zeros((2, 2, 2), np.float32)
    doubt[0, 0, :] = 0.9  # every error ranked above every right voxel
    assert error_detection_auroc(doubt, errors) == pytest.approx(1.0)
    assert error_detection_auroc(1 - doubt, errors) == pytest.approx(0.0)
    assert error_detection_auroc(np.full((2, 2, 2), 0.5, np.float32), errors) == pytest.approx(0.5)
    doubt[0, 0, 1], doubt[1, 1, 1] = 0.2, 0.3  # one of 2 x 6 pairs out of order
    assert error_detection_auroc(doubt, errors) == pytest.approx(11 / 12)
    assert error_detection_auroc(doubt, np.zeros_like(errors)) is None


def test_average_precision_by_hand():
    # Errors ranked 1st and 3rd: precision 1/1 at recall 1/2, then 2/3 at recall 1.
    doubt = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    errors = np.array([1, 0, 1, 0, 0], dtype=bool)
    assert error_detection_average_precision(doubt, errors) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # A tie is one threshold: both tied voxels are flagged together, precision 1/2.
    assert error_detection_average_precision(np.array([0.9, 0.9, 0.1]), np.array([1, 0, 0], bool)) == 0.5
    assert error_detection_average_precision(doubt, np.zeros(5, bool)) is None


def test_boundary_distance_doubt_is_nearness_to_the_predicted_boundary_in_mm():
    labels = np.array([0, 0, 1, 1, 1], dtype=np.uint8).reshape(1, 1, 5)   # boundary: voxels 1 and 2
    assert boundary_distance_doubt(labels).ravel() == pytest.approx([0.5, 1, 1, 0.5, 1 / 3])
    # x (the last array axis) at 2 mm: one voxel away is 2 mm.
    assert boundary_distance_doubt(labels, spacing=(2.0, 1.0, 1.0)).ravel() == pytest.approx([1 / 3, 1, 1, 1 / 3, 1 / 5])
    assert not boundary_distance_doubt(np.zeros((2, 2, 2), np.uint8)).any()
    assert boundary_distance_mm(labels, spacing=(2.0, 1.0, 1.0)).ravel() == pytest.approx([2, 0, 0, 2, 4])
    assert boundary_distance_mm(np.zeros((2, 2, 2), np.uint8)) is None


def test_review_effort_curve_by_hand():
    doubt = np.array([0.9, 0.8, 0.7, 0.6])
    errors = np.array([0, 1, 0, 1], dtype=bool)
    fractions = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    curve = review_effort_curve(doubt, errors, fractions)
    assert curve == pytest.approx([0, 0, 0.5, 0.5, 1])
    assert volume_to_find(curve, fractions, 0.8) == 1.0 and volume_to_find(curve, fractions, 0.5) == 0.5


def test_expected_calibration_error_by_hand():
    # Class 1 at 0.95 on two voxels that are class 1 (gap 0.05), at 0.05 on one of each (observed 0.5: gap 0.45).
    probabilities = np.array([[0.05, 0.05, 0.95, 0.95], [0.95, 0.95, 0.05, 0.05]])
    labels = np.array([1, 1, 1, 0])
    bins = calibration_bins(probabilities, labels, n_bins=10)
    assert bins[0].sum() == 4 and bins[0][9] == 2 and bins[0][0] == 2
    assert expected_calibration_error(bins) == pytest.approx(0.5 * 0.05 + 0.5 * 0.45)
    # Calibrated: class 1 at 0.5 on two voxels, one of which is class 1.
    assert expected_calibration_error(calibration_bins(np.full((2, 2), 0.5), np.array([1, 0]), 10)) == 0


def _unit_geometry(shape):
    return Geometry(shape[::-1], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_fragments_closer_than_the_merge_distance_are_one_region_and_specks_are_left_out():
    review = np.zeros((10, 30, 30), dtype=np.float32)
    review[5, 5, 2:20:2] = 0.8  # a dotted line: 9 one-voxel fragments 1 voxel (1 mm) apart
    review[5, 25, 25] = 0.9  # a lone speck, 5 mm from everything
    geometry = _unit_geometry(review.shape)
    regions = doubtful_regions(Image(review, geometry), threshold=0.5, min_volume_ml=0.005, merge_mm=2.0,
                               radius_mm=None)
    assert len(regions) == 1 and regions[0].voxels == 9
    unmerged = doubtful_regions(Image(review, geometry), threshold=0.5, min_volume_ml=0.0, merge_mm=0.0)
    assert len(unmerged) == 10


def test_every_region_is_returned_and_its_marker_lies_inside_it():
    review = np.zeros((20, 60, 60), dtype=np.float32)
    for n in range(64):  # 64 separate 2x2x2 cubes, 4 voxels apart: no cap on the count
        j, i = divmod(n, 8)
        review[2:4, 4 + 6 * j:6 + 6 * j, 4 + 6 * i:6 + 6 * i] = 0.7
    geometry = _unit_geometry(review.shape)
    assert len(doubtful_regions(Image(review, geometry), threshold=0.5, min_volume_ml=0.0, merge_mm=2.0)) == 64
    # A thick arc (a half ring) left whole: its centre of mass lies in the hole, its marker on the arc.
    arc = np.zeros((9, 41, 41), dtype=np.float32)
    kk, jj, ii = np.mgrid[0:9, 0:41, 0:41]
    radius = np.hypot(jj - 20, ii - 20)
    arc[(radius >= 14) & (radius <= 18) & (jj >= 20) & (kk >= 2) & (kk <= 6)] = 0.6
    arc[4, 36, 20] = 0.95  # the peak, on the arc's middle line
    region, = doubtful_regions(Image(arc, _unit_geometry(arc.shape)), threshold=0.5, radius_mm=None)
    i, j, k = region.marker_ijk
    assert arc[k, j, i] >= 0.5
    assert k == 4 and 14 <= np.hypot(j - 20, i - 20) <= 18  # on the arc, midway through its thickness
    centre_of_mass = np.round(np.argwhere(arc >= 0.5).mean(axis=0)).astype(int)
    assert arc[tuple(centre_of_mass)] < 0.5
