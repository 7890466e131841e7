"""Images with their physical geometry, read and written through SimpleITK.

Conventions (ITK / DICOM, LPS):
* ``Geometry.size`` and ``Geometry.spacing`` are in voxel-axis order (i, j, k); spacing in mm.
* ``Geometry.origin`` is the LPS position (mm) of voxel (0, 0, 0); ``direction`` is the 3x3 matrix,
  row-major, whose column c is the LPS direction of voxel axis c.
* ``Image.array`` is in numpy order (k, j, i) = (D, H, W), as SimpleITK returns it, or
  (C, D, H, W) for a multi-channel image (probabilities, a K-channel map).

Slicer uses RAS and an IJK-to-RAS matrix; :meth:`Geometry.ijk_to_ras` and
:meth:`Geometry.from_ijk_to_ras` convert.
"""
from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_GZIP_CHUNK_BYTES = 1 << 23


class ImageError(ValueError):
    """An image cannot be used as given; the message names the problem and the fix."""


@dataclass(frozen=True)
class Geometry:
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping voxel index (i, j, k, 1) to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix mapping voxel index (i, j, k, 1) to RAS mm (Slicer's IJKToRAS)."""
        m = self.ijk_to_lps()
        m[:3] = np.diag([-1.0, -1.0, 1.0, 1.0])[:3] @ m
        return m

    @classmethod
    def from_ijk_to_ras(cls, matrix, size) -> "Geometry":
        """Geometry of a Slicer volume from its 4x4 IJK-to-RAS matrix and (i, j, k) size."""
        m = np.asarray(matrix, dtype=float).reshape(4, 4)
        lps = _LPS_TO_RAS @ m[:3, :3]
        spacing = np.linalg.norm(lps, axis=0)
        if np.any(spacing <= 0):
            raise ImageError("the IJK-to-RAS matrix has a zero-length axis; the volume geometry is broken")
        direction = lps / spacing
        origin = _LPS_TO_RAS @ m[:3, 3]
        return cls(tuple(int(s) for s in size), tuple(float(s) for s in spacing),
                   tuple(float(o) for o in origin), tuple(float(d) for d in direction.ravel()))

    def same_grid(self, other: "Geometry", tolerance: float = 1e-4) -> bool:
        return (self.size == other.size
                and np.allclose(self.spacing, other.spacing, atol=tolerance)
                and np.allclose(self.origin, other.origin, atol=tolerance * 10)
                and np.allclose(self.direction, other.direction, atol=tolerance))

    def corners_lps(self) -> np.ndarray:
        """(8, 3) LPS positions of the grid's corner voxels."""
        idx = np.array([[i, j, k, 1.0] for i in (0, self.size[0] - 1) for j in (0, self.size[1] - 1)
                        for k in (0, self.size[2] - 1)])
        return (self.ijk_to_lps() @ idx.T).T[:, :3]


@dataclass
class Image:
    array: np.ndarray
    geometry: Geometry

    def __post_init__(self):
        spatial = self.array.shape[-3:]
        if self.array.ndim not in (3, 4) or spatial != tuple(reversed(self.geometry.size)):
            raise ImageError(
                f"array shape {self.array.shape} does not match geometry size {self.geometry.size} "
                "(expected (k, j, i) or (C, k, j, i))"
            )

    @classmethod
    def from_sitk(cls, img: sitk.Image) -> "Image":
        if img.GetDimension() != 3:
            raise ImageError(f"expected a 3D image, got {img.GetDimension()}D")
        arr = sitk.GetArrayFromImage(img)
        if img.GetNumberOfComponentsPerPixel() > 1:
            arr = np.moveaxis(arr, -1, 0)
        geom = Geometry(tuple(img.GetSize()), tuple(img.GetSpacing()), tuple(img.GetOrigin()),
                        tuple(img.GetDirection()))
        return cls(arr, geom)

    def to_sitk(self) -> sitk.Image:
        arr = self.array
        if arr.ndim == 4:
            img = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(arr, 0, -1)), isVector=True)
        else:
            img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        g = self.geometry
        img.SetSpacing(g.spacing)
        img.SetOrigin(g.origin)
        img.SetDirection(g.direction)
        return img

    def with_array(self, array: np.ndarray) -> "Image":
        """The same geometry holding another array (same spatial shape)."""
        return Image(array, self.geometry)


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def read_image(path: str | os.PathLike) -> Image:
    """Read a 3D image (NIfTI, NRRD, MHA/MHD, or a DICOM series folder) keeping its geometry.

    Raises :class:`ImageError` for missing files, unreadable data, 2D or 4D images, and
    non-finite geometry, with a message that says what to do.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            if not _is_dicom_folder(path):
                raise ImageError(f"{path}: folder holds no DICOM series; give an image file or a DICOM series folder")
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])
            img = sitk.ReadImage(files)
        else:
            img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown reader error"
        raise ImageError(
            f"{path}: not a readable medical image ({first[:160]}); "
            f"use NIfTI, NRRD, MHA or a DICOM series folder"
        ) from None
    dim = img.GetDimension()
    if dim == 4:
        raise ImageError(f"{path}: 4D image {img.GetSize()}; AttnSeg needs one 3D volume per modality — "
                         "split the channels/time points into separate files")
    if dim == 2 or 1 in img.GetSize():
        raise ImageError(f"{path}: 2D image of size {img.GetSize()}; AttnSeg segments 3D volumes")
    if dim != 3:
        raise ImageError(f"{path}: {dim}D image; AttnSeg needs a 3D volume")
    if img.GetNumberOfComponentsPerPixel() > 1:
        raise ImageError(f"{path}: {img.GetNumberOfComponentsPerPixel()}-component (colour/vector) image; "
                         "give a scalar volume per modality")
    spacing = np.asarray(img.GetSpacing())
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ImageError(f"{path}: invalid voxel spacing {tuple(spacing)}; fix the header")
    return Image.from_sitk(img)


def write_image(image: Image, path: str | os.PathLike, compression_level: int = 1) -> Path:
    """Write atomically: to a temporary file in the same folder, then rename over ``path``.

    A crash mid-write never leaves a truncated file at ``path``. ``compression_level`` 1 keeps
    gzip fast (the default level 6 triples write time for ~10 % smaller files); 0 stores uncompressed.
    ``.nii.gz`` is written by SimpleITK as plain NIfTI and gzipped with zlib's run-length strategy
    (see :func:`_gzip_file`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        if suffix == ".nii.gz":
            plain = Path(tmp[: -len(".gz")])
            try:
                sitk.WriteImage(image.to_sitk(), str(plain), False)
                _gzip_file(plain, Path(tmp), compression_level)
            finally:
                plain.unlink(missing_ok=True)
        else:
            sitk.WriteImage(image.to_sitk(), tmp, True, compression_level)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _gzip_file(source: Path, target: Path, level: int) -> None:
    """gzip ``source`` into ``target`` with zlib's run-length strategy (Z_RLE).

    Probabilities and maps are float32 noise to deflate's string matcher: it finds few repeats but
    spends most of the write looking. Run-length matching keeps the runs of zeros outside structures
    and writes 2-3x faster (``benchmarks/README.md``); files are as small on soft maps and up to ~10 %
    larger where a trained network saturates (long runs of one non-zero float such as 1.0). The
    output is ordinary gzip that every NIfTI reader opens; its content is byte-identical.
    """
    compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 9, zlib.Z_RLE)
    with open(source, "rb") as plain, open(target, "wb") as packed:
        while chunk := plain.read(_GZIP_CHUNK_BYTES):
            packed.write(compressor.compress(chunk))
        packed.write(compressor.flush())


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder`` (sorted), for batch mode."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))


def case_name(path: str | os.PathLike) -> str:
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
