"""Geometry: reading/writing keeps it, the model frame round trip lands on the input grid, and a
volume stored in another axis order gives the same segmentation in physical space."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from AttnSegLib.image import Geometry, Image, ImageError, read_image, write_image
from AttnSegLib.preprocess import normalise, to_model_frame

T1 = [{"name": "T1", "normalization": "zscore"}]


def test_write_read_keeps_geometry_in_every_format(tmp_path, hippocampus_case):
    image = read_image(hippocampus_case[0])
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        back = read_image(write_image(image, tmp_path / f"case{suffix}"))
        assert back.geometry.same_grid(image.geometry)
        np.testing.assert_array_equal(back.array, image.array)


def test_written_files_get_the_users_usual_permissions(tmp_path, hippocampus_case):
    """Atomic writes go through a private temporary file; the result is readable like any file the
    user makes (mode 0666 minus the umask), not left owner-only."""
    mask = os.umask(0o022)
    os.umask(mask)
    path = write_image(read_image(hippocampus_case[0]), tmp_path / "case.nii.gz")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_dicom_series_folder_is_read_with_geometry(tmp_path, hippocampus_case):
    image = read_image(hippocampus_case[0])
    sitk_img = sitk.Cast(image.to_sitk(), sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.geometry.direction  # row-major 3x3; DICOM wants the i and j axis directions
    row_and_column_cosines = (d[0], d[3], d[6], d[1], d[4], d[7])
    for k in range(sitk_img.GetDepth()):
        slice_k = sitk_img[:, :, k]
        slice_k.SetMetaData("0020|0032", "\\".join(map(str, sitk_img.TransformIndexToPhysicalPoint((0, 0, k)))))
        slice_k.SetMetaData("0020|0037", "\\".join(map(str, row_and_column_cosines)))
        slice_k.SetMetaData("0020|0013", str(k))
        slice_k.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
        slice_k.SetMetaData("0008|0060", "MR")
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(slice_k)
    back = read_image(tmp_path)
    assert back.geometry.size == image.geometry.size
    np.testing.assert_allclose(back.geometry.spacing, image.geometry.spacing, atol=1e-4)
    np.testing.assert_array_equal(back.array, image.array.astype(np.int16))


def test_ijk_to_ras_round_trip():
    direction = sitk.VersorTransform((0.2, 0.3, 0.1), 0.7).GetMatrix()
    geometry = Geometry((10, 20, 30), (0.5, 1.25, 3.0), (12.0, -4.0, 7.5), tuple(direction))
    ras = geometry.ijk_to_ras()
    assert np.allclose(ras[:3, 3], [-12.0, 4.0, 7.5])
    back = Geometry.from_ijk_to_ras(ras, geometry.size)
    assert back.same_grid(geometry)


@pytest.mark.parametrize("bad", ["2d", "4d", "text"])
def test_unusable_images_are_refused_with_a_reason(tmp_path, bad):
    path = tmp_path / f"{bad}.nii.gz"
    if bad == "2d":
        sitk.WriteImage(sitk.Image(16, 16, sitk.sitkFloat32), str(path))
        expected = "2D"
    elif bad == "4d":
        sitk.WriteImage(sitk.Image([8, 8, 8, 3], sitk.sitkFloat32), str(path))
        expected = "4D"
    else:
        path.write_text("not an image")
        expected = "not a readable medical image"
    with pytest.raises(ImageError, match=expected):
        read_image(path)


def test_model_frame_round_trip_is_exact_when_grids_match(hippocampus_case):
    image = read_image(hippocampus_case[0])
    prepared = to_model_frame([image], T1, (1.0, 1.0, 1.0), "RAS")
    assert not prepared.resampled
    labels = read_image(hippocampus_case[1]).array.astype(np.float32)[None]
    back = prepared.to_input_grid(labels, interpolation="nearest")
    np.testing.assert_array_equal(back[0], labels[0])


def _reoriented_copy(image: Image, orientation: str) -> Image:
    return Image.from_sitk(sitk.DICOMOrient(image.to_sitk(), orientation))


@pytest.mark.parametrize("orientation", ["LPS", "PIR", "SAL"])
def test_another_axis_order_returns_to_its_own_grid_exactly(hippocampus_case, orientation):
    """The model frame is RAS; an LPS/PIR/SAL copy is permuted into it and back without loss."""
    labels = _reoriented_copy(read_image(hippocampus_case[1]), orientation)
    prepared = to_model_frame([labels.with_array(labels.array.astype(np.float32))],
                              [{"name": "label", "normalization": "none"}], (1.0, 1.0, 1.0), "RAS")
    assert prepared.resampled
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(prepared.frame.direction) == "RAS"
    back = prepared.to_input_grid(prepared.array, interpolation="nearest")
    np.testing.assert_array_equal(back[0], labels.array)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(angles=st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
       spacing=st.tuples(*[st.floats(0.6, 2.5)] * 3))
def test_any_direction_and_spacing_round_trips_onto_the_input_grid(angles, spacing):
    """Property: for any oblique direction and anisotropic spacing, the model-frame image brought
    back lands on the input grid and reproduces a smooth field to interpolation accuracy."""
    size = (18, 20, 16)
    rotation = sitk.Euler3DTransform((0, 0, 0), *angles).GetMatrix()
    geometry = Geometry(size, spacing, (5.0, -3.0, 2.0), tuple(rotation))
    # A smooth (linear) function of physical position is reproduced exactly by linear resampling.
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in reversed(size)], indexing="ij"), -1)[..., ::-1]
    lps = ijk @ (geometry.direction_matrix @ np.diag(spacing)).T + geometry.origin
    field = (lps @ np.array([0.3, -0.2, 0.5])).astype(np.float32)
    image = Image(field, geometry)
    prepared = to_model_frame([image], [{"name": "f", "normalization": "none"}], (1.0, 1.0, 1.0), "RAS")
    back = prepared.to_input_grid(prepared.array)[0]
    assert back.shape == field.shape
    interior = tuple(slice(3, -3) for _ in range(3))
    np.testing.assert_allclose(back[interior], field[interior], atol=0.05)


def test_modalities_on_different_grids_are_resampled_with_a_notice(hippocampus_case):
    image = read_image(hippocampus_case[0])
    shifted = Image.from_sitk(sitk.Resample(image.to_sitk(), [30, 40, 30], sitk.Transform(), sitk.sitkLinear,
                                            (-2.0, -2.0, 3.0), (1.2, 1.2, 1.2), image.geometry.direction))
    modalities = [{"name": "T1"}, {"name": "T2"}]
    prepared = to_model_frame([image, shifted], modalities, (1.0, 1.0, 1.0), "RAS")
    assert prepared.array.shape[0] == 2
    assert any("T2 had a different grid" in n for n in prepared.notices)


def test_modalities_that_do_not_overlap_are_refused(hippocampus_case):
    image = read_image(hippocampus_case[0])
    far = Image(image.array, Geometry(image.geometry.size, image.geometry.spacing, (500.0, 500.0, 500.0),
                                      image.geometry.direction))
    with pytest.raises(ImageError, match="does not overlap"):
        to_model_frame([image, far], [{"name": "T1"}, {"name": "T2"}], None, None)


def test_wrong_modality_count_names_what_the_model_expects(hippocampus_case):
    image = read_image(hippocampus_case[0])
    with pytest.raises(ImageError, match=r"expects 2 modalities \(T1, T2\) but 1 image"):
        to_model_frame([image], [{"name": "T1"}, {"name": "T2"}], None, None)


def test_non_finite_voxels_are_replaced_and_reported(hippocampus_case):
    image = read_image(hippocampus_case[0])
    arr = image.array.astype(np.float32)
    arr[0, 0, :5] = np.nan
    arr[1, 1, 1] = np.inf
    prepared = to_model_frame([image.with_array(arr)], T1, None, None)
    assert np.isfinite(prepared.array).all()
    assert any("6 NaN/Inf" in n for n in prepared.notices)


def test_normalisations():
    x = np.array([[[0.0, 2.0], [4.0, 6.0]]], dtype=np.float32)
    z = normalise(x, "zscore")
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-6
    nz = normalise(x, "zscore_nonzero")
    assert nz[0, 0, 0] == 0 and abs(nz[x != 0].mean()) < 1e-6
    assert np.all(normalise(np.full((2, 2, 2), 7.0), "zscore") == 0)
    with pytest.raises(ImageError, match="unknown normalisation"):
        normalise(x, "minmax")
