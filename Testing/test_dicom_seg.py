"""`attnseg segment --dicom-seg`: a DICOM Segmentation that references the source series and holds the labels.

Real images written as real DICOM series, the shipped default model, the SEG read back with pydicom (frames
decoded by hand, not by the library that wrote them), highdicom, and dcmqi, the converter Slicer's DICOM
module (QuantitativeReporting) reads a SEG with.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from AttnSegLib.cli import main
from AttnSegLib.image import Image, read_image

hd = pytest.importorskip("highdicom")

PATIENT_T1 = "ms_lesions/patient07/T1_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz"


def write_scanner_series(image: Image, folder, uid_root: str) -> None:
    """``image`` as one MR series as a scanner exports it: one file per k slice, its geometry in the position
    tags, one study, frame of reference and patient for all slices (file names out of slice order), no
    SliceThickness (MR allows it empty)."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.Cast(image.to_sitk(), sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.geometry.direction
    shared = {"0020|000d": f"{uid_root}.1", "0020|000e": f"{uid_root}.2", "0020|0052": f"{uid_root}.3",
              "0010|0010": "Test^Patient", "0010|0020": "ATTNSEG-TEST", "0008|0060": "MR", "0020|0011": "3",
              "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
              "0020|0037": "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7])))}
    for k in range(volume.GetDepth()):
        plane = volume[:, :, k]
        for tag, value in shared.items():
            plane.SetMetaData(tag, value)
        plane.SetMetaData("0020|0032", "\\".join(map(str, volume.TransformIndexToPhysicalPoint((0, 0, k)))))
        plane.SetMetaData("0020|0013", str(k + 1))
        plane.SetMetaData("0008|0018", f"{uid_root}.4.{k + 1}")
        writer.SetFileName(str(folder / f"{(k * 7919) % 10007:05d}.dcm"))
        writer.Execute(plane)


def _check_segmentation(out, series_folder) -> pydicom.Dataset:
    """Assert ``out/segmentation.dcm`` is a binary SEG of ``out/labels.nii.gz`` on the series in ``series_folder``:
    every frame references the source slice at its own position, and the frames decoded per segment equal
    the label map voxel for voxel. Returns the SEG."""
    seg = pydicom.dcmread(out / "segmentation.dcm")
    labels = read_image(out / "labels.nii.gz")
    grid = labels.to_sitk()
    sources = [pydicom.dcmread(p) for p in sorted(series_folder.iterdir())]
    slice_of = {}  # source SOPInstanceUID -> label slice k, from the source's own ImagePositionPatient
    for source in sources:
        index = grid.TransformPhysicalPointToContinuousIndex([float(v) for v in source.ImagePositionPatient])
        assert np.allclose(index, np.round(index), atol=1e-3) and round(index[0]) == round(index[1]) == 0
        slice_of[source.SOPInstanceUID] = round(index[2])
    assert sorted(slice_of.values()) == list(range(labels.array.shape[0]))

    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == \
        set(slice_of)
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "hippocampus_difficulty_aware"
    assert algorithm.AlgorithmVersion.startswith("sha256:")
    assert algorithm.AlgorithmSource.startswith("AttnSeg ")

    decoded = np.zeros((len(seg.SegmentSequence) + 1,) + labels.array.shape, dtype=bool)
    frames = seg.pixel_array.reshape((-1, seg.Rows, seg.Columns))
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        source_uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = slice_of[source_uid]
        source = next(s for s in sources if s.SOPInstanceUID == source_uid)
        assert np.allclose([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
                           [float(v) for v in source.ImagePositionPatient], atol=1e-3)
        segment = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        decoded[segment, k] = frame.astype(bool)
    for value in range(1, decoded.shape[0]):
        assert np.array_equal(decoded[value], labels.array == value), f"segment {value} differs from labels.nii.gz"
    assert labels.array.max() < decoded.shape[0] and np.count_nonzero(labels.array) > 0
    return seg


def test_hippocampus_crop_series_gives_a_seg_equal_to_the_labels(hippocampus_case, tmp_path, capsys):
    series = tmp_path / "series"
    write_scanner_series(read_image(hippocampus_case[0]), series, "1.2.826.0.1.3680043.2.1125.1301")
    out = tmp_path / "out"
    assert main(["segment", "-i", str(series), "-o", str(out), "--device", "cpu", "--no-maps", "--dicom-seg"]) == 0
    seg = _check_segmentation(out, series)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Anterior", "Posterior"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"  # no codes on the card
    highdicom_view = hd.seg.segread(out / "segmentation.dcm")
    assert highdicom_view.get_segment_numbers() == [1, 2]


def test_whole_head_series_gives_per_side_segments_with_snomed_codes(data_dir, tmp_path):
    series = tmp_path / "series"
    write_scanner_series(read_image(data_dir / PATIENT_T1), series, "1.2.826.0.1.3680043.2.1125.1302")
    out = tmp_path / "out"
    assert main(["segment", "-i", str(series), "-o", str(out), "--device", "cpu", "--no-maps", "--dicom-seg"]) == 0
    seg = _check_segmentation(out, series)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [
        "Left anterior hippocampus", "Left posterior hippocampus", "Right anterior hippocampus",
        "Right posterior hippocampus"]
    for segment, side in zip(seg.SegmentSequence, ("7771000", "7771000", "24028007", "24028007")):
        kind = segment.SegmentedPropertyTypeCodeSequence[0]
        assert (kind.CodingSchemeDesignator, kind.CodeValue) == ("SCT", "5976009")  # hippocampus
        assert kind.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == side
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    _check_viewer_volume(out)
    _check_dcmqi_reads_it(out, tmp_path / "dcmqi")


def _check_viewer_volume(out) -> None:
    """highdicom's volume of the SEG (sorted by position as a viewer sorts it) puts every mask voxel where
    labels.nii.gz has it in patient space (the series runs head to foot, the volume foot to head)."""
    volume = hd.seg.segread(out / "segmentation.dcm").get_volume(combine_segments=True)
    labels = read_image(out / "labels.nii.gz")
    grid, direction = labels.to_sitk(), np.reshape(labels.geometry.direction, (3, 3))
    assert np.allclose(volume.affine[:3, 2] / labels.geometry.spacing[0], direction[:, 0])  # columns run along i
    assert np.allclose(volume.affine[:3, 1] / labels.geometry.spacing[1], direction[:, 1])  # rows along j
    array = volume.array
    for s in range(array.shape[0]):
        index = grid.TransformPhysicalPointToIndex((volume.affine @ [s, 0, 0, 1])[:3].tolist())
        assert index[:2] == (0, 0) and np.array_equal(array[s], labels.array[index[2]])
    assert np.count_nonzero(array) == np.count_nonzero(labels.array)


def test_dicom_seg_of_a_nifti_input_is_refused_in_one_line(hippocampus_case, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["segment", "-i", str(hippocampus_case[0]), "-o", str(out), "--device", "cpu", "--dicom-seg"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dicom-seg needs a DICOM series folder" in err
    assert not out.exists() or not any(out.iterdir())  # refused before anything was written


def _check_dcmqi_reads_it(out, folder) -> None:
    """dcmqi's segimage2itkimage, the converter Slicer's QuantitativeReporting reads a SEG with, gives each
    segment's label, codes and mask back, the mask equal to labels.nii.gz where it lies in patient space."""
    import json
    import subprocess
    import sys

    converter = Path(sys.executable).with_name("segimage2itkimage")
    if not converter.exists():
        pytest.skip("dcmqi is not installed (pip install 'attnseg[dev]')")
    folder.mkdir()
    done = subprocess.run([str(converter), "--inputDICOM", str(out / "segmentation.dcm"), "--outputDirectory",
                           str(folder), "--outputType", "nrrd"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "absent" not in done.stdout + done.stderr, done.stdout[-2000:]  # dcmqi's word for a missing attribute
    meta = json.loads((folder / "meta.json").read_text())
    segments = [group[0] for group in meta["segmentAttributes"]]
    assert [s["SegmentLabel"] for s in segments][:2] == ["Left anterior hippocampus", "Left posterior hippocampus"]
    assert segments[2]["SegmentedPropertyTypeModifierCodeSequence"]["CodeValue"] == "24028007"  # right
    labels = read_image(out / "labels.nii.gz")
    for segment in segments:
        mask = sitk.ReadImage(str(folder / f"{segment['labelID']}.nrrd"))
        on_labels = sitk.GetArrayFromImage(sitk.Resample(mask, labels.to_sitk(), sitk.Transform(),
                                                         sitk.sitkNearestNeighbor, 0))
        assert np.array_equal(on_labels > 0, labels.array == segment["labelID"])

