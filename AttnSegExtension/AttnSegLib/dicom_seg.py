"""A result as a DICOM Segmentation object (binary, one segment per class) referencing its source series.

The labels lie on the grid SimpleITK read from the series, so label slice k is one source slice: each
slice is matched to the source instance whose ImagePositionPatient is the slice's LPS origin (ITK's LPS
is DICOM's patient coordinate system), and the frames take that instance's position and orientation.
Segment terminology comes from a class's ``terminology`` entry ([scheme, code, meaning] per field, e.g.
SNOMED CT hippocampus with a left/right modifier); a class without one is described as generic tissue.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import __version__
from .image import Geometry, ImageError, dicom_series

# Slicer's generic terminology entry, for a class whose card gives no codes.
_DEFAULT_TERMINOLOGY = {"category": ["SCT", "85756007", "Tissue"], "type": ["SCT", "85756007", "Tissue"]}
_POSITION_TOLERANCE = 0.05  # of the slice spacing: a source slice farther from a label slice is not it
_ORIENTATION_TOLERANCE = 1e-4


def source_datasets(folder: Path) -> list:
    """The pydicom datasets of the one DICOM series in ``folder`` (any order)."""
    import pydicom

    series = dicom_series(folder)
    if len(series) != 1:
        raise ImageError(f"{folder}: a DICOM Segmentation needs a folder holding exactly one DICOM series "
                         f"(found {len(series)}); give the series folder the labels were computed on")
    datasets = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            dataset = pydicom.dcmread(path)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        if dataset.get("SeriesInstanceUID") == series[0]:
            datasets.append(dataset)
    return datasets


def slice_sources(geometry: Geometry, datasets: list) -> list:
    """The source dataset of each label slice k (length ``geometry.size[2]``), matched by position.

    Raises :class:`ImageError` when the series is not one single-frame slice per label slice in the
    labels' orientation (a multi-frame file, a missing or an extra slice).
    """
    size_k, spacing_k = geometry.size[2], geometry.spacing[2]
    if any(int(d.get("NumberOfFrames", 1)) != 1 for d in datasets) or len(datasets) != size_k:
        raise ImageError(f"the DICOM series holds {len(datasets)} file(s) for {size_k} slices; a DICOM Segmentation "
                         "is written for a series of single-frame slices only — write the labels.nii.gz instead")
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    origin = np.asarray(geometry.origin, dtype=float)
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
    sources = []
    for k in range(size_k):
        distance = np.linalg.norm(positions - (origin + k * spacing_k * direction[:, 2]), axis=1)
        nearest = int(np.argmin(distance))
        cosines = np.asarray([float(v) for v in datasets[nearest].ImageOrientationPatient])
        if distance[nearest] > _POSITION_TOLERANCE * spacing_k or \
                np.abs(cosines - direction[:, :2].T.ravel()).max() > _ORIENTATION_TOLERANCE:
            raise ImageError(f"label slice {k} matches no slice of the DICOM series (nearest "
                             f"{distance[nearest]:.3f} mm away or differently oriented); the labels are not on "
                             "this series' grid")
        sources.append(datasets[nearest])
    for tag in ("StudyInstanceUID", "FrameOfReferenceUID"):
        if len({d.get(tag) for d in sources}) != 1 or sources[0].get(tag) is None:
            raise ImageError(f"the DICOM series' slices do not share one {tag}; a DICOM Segmentation references a "
                             "single study and frame of reference — export the series again from the scanner or PACS")
    return sources


def coded_concept(code: list):
    """``[scheme, value, meaning]`` -> a highdicom CodedConcept."""
    from highdicom.sr import CodedConcept

    scheme, value, meaning = code
    return CodedConcept(value=str(value), scheme_designator=str(scheme), meaning=str(meaning))


def segment_descriptions(classes: list[dict], algorithm) -> list:
    """One highdicom SegmentDescription per foreground class (segment number = label value)."""
    from highdicom.color import CIELabColor
    from highdicom.seg import SegmentAlgorithmTypeValues, SegmentDescription

    descriptions = []
    for cls in classes[1:]:
        terminology = cls.get("terminology") or _DEFAULT_TERMINOLOGY
        description = SegmentDescription(
            segment_number=int(cls["value"]), segment_label=cls["name"],
            segmented_property_category=coded_concept(terminology["category"]),
            segmented_property_type=coded_concept(terminology["type"]),
            algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            display_color=CIELabColor.from_rgb(*cls.get("color", (255, 255, 0))))
        if "typeModifier" in terminology:  # nested in the type item, where dcmqi and Slicer read it
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                coded_concept(terminology["typeModifier"])]
        descriptions.append(description)
    return descriptions


def write_dicom_seg(result, package, folder: Path, path: Path) -> Path:
    """Write ``result.labels`` (on the grid of the DICOM series in ``folder``) as a binary DICOM SEG at ``path``.

    ``result``: an :class:`~AttnSegLib.inference.Result`; its ``classes`` name the segments.
    ``package``: the :class:`~AttnSegLib.package.ModelPackage` that made it (algorithm identification).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = slice_sources(result.labels.geometry, source_datasets(folder))
    labels = result.labels.array  # (D, H, W) = (slices, rows, columns)
    if labels.shape[1:] != (int(sources[0].Rows), int(sources[0].Columns)):
        raise ImageError(f"labels of {labels.shape[1:]} voxels per slice do not match the series' "
                         f"{sources[0].Rows} x {sources[0].Columns}; the labels are not on this series' grid")
    for source in sources:  # in memory only: highdicom needs it, and MR allows it empty
        if source.get("SliceThickness") in (None, ""):
            source.SliceThickness = result.labels.geometry.spacing[2]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=package.name, family=codes.cid7162.ArtificialIntelligence,
        version=f"sha256:{package.sha256[:16]}", source=f"AttnSeg {__version__}",
        parameters={"architecture": package.card.architecture})
    segmentation = hd.seg.Segmentation(
        source_images=sources, pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(result.classes, algorithm),
        series_instance_uid=hd.UID(), series_number=int(sources[0].get("SeriesNumber") or 0) + 1000,
        sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="AttnSeg", manufacturer_model_name=package.name[:64], software_versions=__version__,
        device_serial_number="none", content_label="ATTNSEG",
        content_description=f"AttnSeg {package.name}"[:64], series_description=f"AttnSeg {package.name}"[:64])
    segmentation.ContentCreatorName = ""  # type 2: present, empty (no person made it)
    segmentation.save_as(path)
    return path
