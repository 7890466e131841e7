"""Geometry: a volume and a copy of it stored in another axis order (the same physical image) get the
same segmentation in physical space — whatever the direction matrix (oblique included), the axis
order and the voxel spacing — through the Predictor and through the ``attnseg`` command.

The copies are made here with numpy (transpose, flip) and hand-computed geometry, independently of
the ITK reorientation the engine uses, so an error in the engine cannot cancel itself out. The
deterministic cases use the shipped trained package (``default_package()``); the property-based test
(hypothesis, random rotations, spacings, axis orders and flips) uses a small untrained network, since it
compares the two predictions with each other, not with a reference.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from AttnSegLib import models
from AttnSegLib.image import Geometry, Image, read_image, write_image
from AttnSegLib.inference import Predictor
from AttnSegLib.metrics import evaluate_labels
from AttnSegLib.package import default_package

ATTNSEG = Path(sys.executable).with_name("attnseg")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stored_in_another_axis_order(image: Image, order: tuple[int, int, int], flips: tuple[bool, bool, bool]):
    """The same physical image with its voxel axes permuted and reversed.

    New voxel axis c (ITK i, j, k order) is old axis ``order[c]``, read backwards where ``flips[c]``.
    Returns (copy, back) where ``back(array)`` maps a (..., D, H, W) array on the copy's grid onto the
    original's grid.
    """
    g = image.geometry
    columns = g.direction_matrix
    size = tuple(g.size[a] for a in order)
    spacing = tuple(g.spacing[a] for a in order)
    direction = np.stack([(-1.0 if f else 1.0) * columns[:, a] for a, f in zip(order, flips)], axis=1)
    origin = np.asarray(g.origin, dtype=float)
    for a, f in zip(order, flips):
        if f:
            origin = origin + (g.size[a] - 1) * g.spacing[a] * columns[:, a]
    # numpy axes are (k, j, i): new numpy axis n holds ITK axis 2 - n
    numpy_order = [2 - order[2 - n] for n in range(3)]
    flipped = tuple(n for n in range(3) if flips[2 - n])
    array = np.flip(np.transpose(image.array, numpy_order), flipped).copy()
    copy = Image(array, Geometry(size, spacing, tuple(origin), tuple(direction.ravel())))

    def back(values: np.ndarray) -> np.ndarray:
        lead = values.ndim - 3
        unflipped = np.flip(values, tuple(lead + n for n in flipped))
        return np.transpose(unflipped, list(range(lead)) + [lead + n for n in np.argsort(numpy_order)])

    return copy, back


def assert_same_segmentation(reference, other, back) -> None:
    """Probabilities agree to 1e-4 everywhere; labels agree wherever the two top classes differ by
    more than that (elsewhere the argmax of a tie may fall either way)."""
    probabilities = back(other.probabilities.array)
    np.testing.assert_allclose(probabilities, reference.probabilities.array, atol=1e-4)
    top = np.sort(reference.probabilities.array, axis=0)
    clear = (top[-1] - top[-2]) > 2e-4
    np.testing.assert_array_equal(back(other.labels.array)[clear], reference.labels.array[clear])


def test_the_copies_are_the_same_physical_image(hippocampus_case):
    """Guard for the helper: every voxel of a copy sits where the same value sits in the original."""
    image = read_image(hippocampus_case[0])
    copy, back = stored_in_another_axis_order(image, (2, 0, 1), (True, False, True))
    np.testing.assert_array_equal(back(copy.array), image.array)
    original, moved = image.to_sitk(), copy.to_sitk()
    rng = np.random.default_rng(0)
    for _ in range(20):
        index = [int(rng.integers(0, n)) for n in copy.geometry.size]
        point = moved.TransformIndexToPhysicalPoint(index)
        source = original.TransformPhysicalPointToIndex(point)
        assert moved[index] == original[source]


# -- the shipped trained package -------------------------------------------------------------------
ORDERS = {  # name: (axis order, flips)
    "pir": ((1, 2, 0), (True, True, False)),
    "kji_flipped": ((2, 1, 0), (False, True, True)),
}


def oblique_rescan(image: Image) -> Image:
    """The same anatomy on an oblique, anisotropic grid (rotated 11-17 degrees about each axis,
    0.8 x 1.2 x 1.5 mm voxels, centred on the original): what a tilted acquisition would give."""
    g = image.geometry
    rotation = np.asarray(sitk.Euler3DTransform((0, 0, 0), 0.2, -0.25, 0.3).GetMatrix()).reshape(3, 3)
    spacing = np.array([0.8, 1.2, 1.5])
    centre = g.ijk_to_lps()[:3] @ np.append((np.asarray(g.size) - 1) / 2, 1.0)
    size = np.ceil(np.asarray(g.size) * np.asarray(g.spacing) / spacing).astype(int) + 4
    origin = centre - rotation @ (spacing * (size - 1) / 2)
    grid = Geometry(tuple(int(n) for n in size), tuple(spacing), tuple(origin), tuple(rotation.ravel()))
    return Image(_resample(image, grid, sitk.sitkLinear), grid)


def _resample(image: Image, grid: Geometry, interpolator) -> np.ndarray:
    reference = sitk.Image(list(grid.size), sitk.sitkUInt8)
    reference.SetSpacing(grid.spacing)
    reference.SetOrigin(grid.origin)
    reference.SetDirection(grid.direction)
    return sitk.GetArrayFromImage(sitk.Resample(image.to_sitk(), reference, sitk.Transform(), interpolator, 0.0))


@pytest.fixture(scope="module")
def volumes(hippocampus_case) -> dict[str, tuple[Image, object]]:
    """name -> (image, back-mapping onto its reference): the real case, copies in other axis orders,
    the same anatomy rescanned obliquely (see :func:`oblique_rescan`) and a copy of that."""
    image = read_image(hippocampus_case[0])
    out = {"original": (image, None)}
    for name, (order, flips) in ORDERS.items():
        out[name] = stored_in_another_axis_order(image, order, flips)
    oblique = oblique_rescan(image)
    out["oblique"] = (oblique, None)
    out["oblique_pir"] = stored_in_another_axis_order(oblique, *ORDERS["pir"])
    return out


@pytest.fixture(scope="module")
def shipped_results(volumes):
    package = default_package()
    predictor = Predictor(package, device="cpu")
    return package, {name: predictor.predict([image]) for name, (image, _) in volumes.items()}


def test_shipped_package_segments_the_real_case(shipped_results, hippocampus_case):
    """The package under test is the real trained one: it finds both hippocampus parts."""
    package, results = shipped_results
    reference = read_image(hippocampus_case[1])
    scores = evaluate_labels(results["original"].labels.array, reference.array, reference.geometry.spacing, [1, 2])
    assert package.name.startswith("hippocampus_") and package.card["metrics"]["mean_dice"] > 0.85
    assert scores["1"]["dice"] > 0.8 and scores["2"]["dice"] > 0.8, scores


@pytest.mark.parametrize("copy, reference", [("pir", "original"), ("kji_flipped", "original"),
                                             ("oblique_pir", "oblique")])
def test_predictor_gives_the_same_segmentation_in_any_axis_order(shipped_results, volumes, copy, reference):
    _, results = shipped_results
    assert results[copy].labels.geometry == volumes[copy][0].geometry  # each on its own grid
    assert_same_segmentation(results[reference], results[copy], volumes[copy][1])
    assert (results[reference].labels.array > 0).sum() > 500


def test_oblique_anisotropic_rescan_is_segmented_like_the_original(shipped_results, volumes):
    """The same anatomy scanned obliquely at 0.8 x 1.2 x 1.5 mm: its labels, brought back onto the
    original grid, overlap the original's (Dice > 0.8 per structure; the two scans sample the anatomy
    differently, so not exactly)."""
    _, results = shipped_results
    original = volumes["original"][0]
    on_original_grid = _resample(results["oblique"].labels, original.geometry, sitk.sitkNearestNeighbor)
    scores = evaluate_labels(on_original_grid, results["original"].labels.array, original.geometry.spacing, [1, 2])
    assert scores["1"]["dice"] > 0.8 and scores["2"]["dice"] > 0.8, scores
    assert any("reoriented" in n and "resampled" in n for n in results["oblique"].notices)


def test_attnseg_command_gives_the_predictors_segmentation_in_every_axis_order(shipped_results, volumes, tmp_path):
    """One ``attnseg segment`` batch run over the copies (shipped default model): each case's files
    are the Predictor's result on that case's own grid, so the copies agree in physical space too."""
    _, results = shipped_results
    cases = tmp_path / "cases"
    for name, (image, _) in volumes.items():
        write_image(image, cases / f"{name}.nii.gz")
    done = subprocess.run([str(ATTNSEG), "segment", "-i", str(cases), "-o", str(tmp_path / "out")],
                          capture_output=True, encoding="utf-8", timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    for name, (image, _) in volumes.items():
        labels = read_image(tmp_path / "out" / name / "labels.nii.gz")
        assert labels.geometry.same_grid(image.geometry)
        probabilities = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / name / "probabilities.nii.gz")))
        np.testing.assert_allclose(np.moveaxis(probabilities, -1, 0), results[name].probabilities.array, atol=1e-5)
        top = np.sort(results[name].probabilities.array, axis=0)
        clear = (top[-1] - top[-2]) > 1e-4
        np.testing.assert_array_equal(labels.array[clear], results[name].labels.array[clear])


# -- any direction, axis order and spacing (property) -----------------------------------------------
@pytest.fixture(scope="module")
def small_predictor():
    torch.manual_seed(0)
    card = {"name": "geometry_property", "architecture": {"name": "unet", "kwargs": {"features": [4, 8]}},
            "modalities": [{"name": "T1", "normalization": "zscore"}],
            "classes": [{"value": 0, "name": "background"}, {"value": 1, "name": "a"}, {"value": 2, "name": "b"}],
            "patch_size_dhw": [16, 16, 16], "spacing_xyz_mm": [1.0, 1.0, 1.0], "orientation": "RAS",
            "inference": {"overlap": 0.25, "batch_size": 2}}
    return Predictor(models.build("unet", 1, 3, features=[4, 8]), card=card, device="cpu")


@pytest.fixture(scope="module")
def small_case(hippocampus_case) -> np.ndarray:
    """A 22 x 26 x 18 crop of the real case around the hippocampus."""
    return read_image(hippocampus_case[0]).array[8:26, 12:38, 6:28].astype(np.float32)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(angles=st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
       spacing=st.tuples(*[st.floats(0.6, 2.2)] * 3),
       order=st.permutations([0, 1, 2]), flips=st.tuples(st.booleans(), st.booleans(), st.booleans()))
def test_any_direction_spacing_and_axis_order_gives_the_same_segmentation(small_predictor, small_case, angles,
                                                                          spacing, order, flips):
    rotation = sitk.Euler3DTransform((0, 0, 0), *angles).GetMatrix()
    size = tuple(reversed(small_case.shape))
    image = Image(small_case, Geometry(size, spacing, (10.0, -20.0, 5.0), rotation))
    copy, back = stored_in_another_axis_order(image, tuple(order), flips)
    reference, other = small_predictor.predict([image]), small_predictor.predict([copy])
    assert reference.labels.geometry == image.geometry and other.labels.geometry == copy.geometry
    np.testing.assert_allclose(reference.probabilities.array.sum(axis=0), 1.0, atol=1e-4)  # edges included
    assert_same_segmentation(reference, other, back)
