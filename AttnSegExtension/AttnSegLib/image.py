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

import contextlib
import errno
import gzip
import math
import os
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import AttnSegError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_GZIP_CHUNK_BYTES = 1 << 23
DEFLATE_MIN_RUN_FRACTION = 0.1  # see worth_deflating
_DIRECTION_EPSILON = 1e-12
# Direction cosines of a real scan are perpendicular to float32 and DICOM rounding (~1e-6); a sheared grid
# (an affine transform hardened in Slicer, saved as NRRD) is not: its results, written as NIfTI, came back
# on another, orthogonalised grid (rotated 11 degrees, voxels 7.7 % larger for a 22-degree shear).
_SHEAR_TOLERANCE = 1e-3
_DICOM_SAME_POSITION_MM = 0.01  # two slices closer than this lie at one position
_DICOM_GAP_FACTOR = 1.5  # a step this many times the usual one between slices is a gap (a missing slice: 2)
_METAIMAGE_HEADER_BYTES = 1 << 16
_METAIMAGE_MAX_DIMS = 10  # MetaIO's limit
_DETACHED_HEADER_SUFFIXES = (".mhd", ".nhdr")
_NIFTI_HEADER_BYTES = {348: 352, 540: 544}  # sizeof_hdr -> smallest voxel offset in a .nii
_NRRD_HEADER_BYTES = 1 << 20
_NIFTI_PAIR_SUFFIXES = (".hdr", ".hdr.gz", ".img", ".img.gz")


class ImageError(AttnSegError, ValueError):
    """An image cannot be used as given; the message names the problem and the fix."""


@dataclass(frozen=True)
class Geometry:
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def __post_init__(self):
        # Rounding noise such as sin(5e-324) makes ITK's SVD of the direction fail (every resample
        # then returns zeros); entries this small are zero in any real scanner geometry.
        direction = tuple(0.0 if abs(d) < _DIRECTION_EPSILON else float(d) for d in self.direction)
        object.__setattr__(self, "direction", direction)

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

    @classmethod
    def from_sitk(cls, img: sitk.Image) -> "Geometry":
        return cls(tuple(img.GetSize()), tuple(img.GetSpacing()), tuple(img.GetOrigin()), tuple(img.GetDirection()))

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
        return cls(arr, Geometry.from_sitk(img))

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


def label_dtype(classes: int) -> np.dtype:
    """The unsigned integer type holding class indices 0..classes-1: uint8 up to 256 classes, else uint16
    (a card has at most 65536, ``package.MAX_CLASSES``). Every label map (inference, Slicer, training)
    takes its type from here, so that class 290 is never stored as 34."""
    return np.dtype(np.uint8) if classes <= 256 else np.dtype(np.uint16)


def dicom_series(path: Path) -> tuple[str, ...]:
    """The DICOM series UIDs in folder ``path`` (empty when it holds none), without ITK's console warnings."""
    if not path.is_dir():
        return ()
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        with itk_file_name(path) as name:
            return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(name))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a byte that is not UTF-8, kept by Python as a lone surrogate
        return False
    return True


def _image_suffix(name: str) -> str:
    return next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), "")


@contextlib.contextmanager
def itk_file_name(path: str | os.PathLike):
    """A name of ``path`` SimpleITK can take (yields a str).

    SimpleITK hands names to C++ as UTF-8; a name holding bytes that are not UTF-8 (a Latin-1
    ``M\xfcller.nii.gz`` from a Windows share) makes it abort the whole process. Such a path is
    reached through a symbolic link with an ASCII name in a private temporary folder: a link to its
    folder when only a folder name is not UTF-8 (a header's detached data file is then still found
    beside it), else a link to the file or folder itself. The link is removed on exit. A detached
    header (.mhd, .nhdr) whose own name is not UTF-8 is refused: its data file would not be found.
    """
    text = os.fspath(path)
    if _is_utf8(text):
        yield text
        return
    absolute = Path(os.path.abspath(text))
    if not _is_utf8(absolute.name) and absolute.name.lower().endswith(_DETACHED_HEADER_SUFFIXES):
        raise ImageError(f"{path}: the file name is not valid UTF-8 and the header names a separate data file; "
                         "rename the header to a UTF-8 name")
    with tempfile.TemporaryDirectory(prefix="attnseg-name-") as tmp:
        if _is_utf8(absolute.name):
            os.symlink(absolute.parent, Path(tmp) / "folder")
            yield str(Path(tmp) / "folder" / absolute.name)
        else:
            link = Path(tmp) / f"image{_image_suffix(absolute.name)}"
            os.symlink(absolute, link)
            yield str(link)


def _reader_reason(err: RuntimeError) -> str:
    """The informative line of a SimpleITK reader exception, without ITK's source locations."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Exception thrown in SimpleITK")
             and not line.startswith("Reason:") and "trouble" not in line]
    reason = lines[-1] if lines else "unknown reader error"
    reason = re.sub(r"^(ITK ERROR: \w+\(0x[0-9a-f]+\): |sitk::ERROR: |\[\w+\] \w+: )", "", reason)
    if reason.startswith("Unable to determine ImageIO reader"):
        reason = "unknown or damaged file format"
    return reason[:200]


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Bytes a single-file NIfTI-1/2 must hold (header, extensions, voxels), from its header.

    None when ``header`` is not a NIfTI header with sane dimensions (the reader then decides).
    """
    for order in "<>":
        if len(header) < 4 or struct.unpack(order + "i", header[:4])[0] not in _NIFTI_HEADER_BYTES:
            continue
        sizeof_hdr = struct.unpack(order + "i", header[:4])[0]
        if len(header) < sizeof_hdr:
            return None
        if sizeof_hdr == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = struct.unpack(order + "f", header[108:112])[0]
        else:
            dims = struct.unpack(order + "8q", header[16:80])
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            offset = struct.unpack(order + "q", header[168:176])[0]
        ndim = dims[0]
        if not (1 <= ndim <= 7 and all(d >= 1 for d in dims[1:ndim + 1]) and bitpix in (8, 16, 24, 32, 64, 128, 256)
                and math.isfinite(offset) and 0 <= offset < 2**40):
            return None
        offset = max(int(offset), _NIFTI_HEADER_BYTES[sizeof_hdr])
        return offset + math.prod(dims[1:ndim + 1]) * bitpix // 8
    return None


def _check_nifti_complete(path: Path) -> None:
    """Refuse a truncated or damaged .nii/.nii.gz: ITK's NIfTI reader silently fills missing voxels with 0.

    Uncompressed: the file size against the header. Gzipped: the length gzip records in its trailer
    (read in constant time); only when that disagrees is the stream decompressed to count its bytes.
    """
    gzipped = path.name.lower().endswith(".gz")
    try:
        if not gzipped:
            with open(path, "rb") as f:
                expected = _nifti_expected_bytes(f.read(544))
            actual = path.stat().st_size
        else:
            with gzip.open(path, "rb") as f:
                expected = _nifti_expected_bytes(f.read(544))
            if expected is None:
                return
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                if struct.unpack("<I", f.read(4))[0] == expected % 2**32:
                    return
            actual = 0
            with gzip.open(path, "rb") as f:
                while chunk := f.read(_GZIP_CHUNK_BYTES):
                    actual += len(chunk)
    except EOFError:
        raise ImageError(f"{path}: the file is truncated (the compressed data ends early); "
                         "the copy or download was incomplete — copy the file again") from None
    except (OSError, zlib.error) as err:
        raise ImageError(f"{path}: damaged compressed file ({err}); copy the file again") from None
    if expected is not None and actual < expected:
        raise ImageError(f"{path}: the file is truncated: it holds {actual} of the {expected} bytes its "
                         "header promises; the copy or download was incomplete — copy the file again")


def _metaimage_fields(path: Path) -> dict[bytes, bytes]:
    """The ``Key = Value`` fields of a MetaImage header (keys lower-cased), up to ``ElementDataFile``,
    the last field: what follows it is voxels or, for ``LIST``, file names. MetaIO ends a key at
    ``=`` or ``:``, whichever comes first."""
    with open(path, "rb") as f:
        head = f.read(_METAIMAGE_HEADER_BYTES)
    fields = {}
    for line in head.split(b"\n"):
        cut = min((i for i in (line.find(b"="), line.find(b":")) if i >= 0), default=-1)
        key = (line if cut < 0 else line[:cut]).strip().lower()
        if cut >= 0:
            fields.setdefault(key, line[cut + 1:].strip())
        if key == b"elementdatafile":
            break
    return fields


def _check_metaimage_header(path: Path) -> None:
    """Refuse a MetaImage (.mha/.mhd) header whose NDims/DimSize ITK cannot take: its reader crashes
    the whole process (segmentation fault) on e.g. ``NDims = -1`` instead of raising."""
    fields = _metaimage_fields(path)
    ndims, sizes = fields.get(b"ndims", b""), fields.get(b"dimsize", b"").split()
    if not (ndims.isdigit() and 1 <= int(ndims) <= _METAIMAGE_MAX_DIMS
            and len(sizes) >= int(ndims) and all(v.isdigit() for v in sizes[:int(ndims)])):
        raise ImageError(f"{path}: damaged MetaImage header (NDims {ndims.decode(errors='replace')[:20]!r}, DimSize "
                         f"{b' '.join(sizes).decode(errors='replace')[:40]!r}); export the image again")


def _nrrd_data_file(path: Path) -> str | None:
    """The value of a NRRD header's ``data file`` field, or None when the voxels follow the header.

    Teem matches field names case-insensitively and takes ``datafile`` too; ``key:=value`` lines are
    key/value pairs, not fields. A header whose end is not within the first MiB is refused: the
    field could hide past any limit read here.
    """
    with open(path, "rb") as f:
        head = f.read(_NRRD_HEADER_BYTES + 1)
    for line in head.split(b"\n")[1:]:
        line = line.rstrip(b"\r")
        if not line:
            return None
        if line.startswith(b"#") or b": " not in line or line.find(b":=") == line.find(b":"):
            continue
        key, _, value = line.partition(b": ")
        if key.strip().lower().replace(b" ", b"") == b"datafile":
            return value.strip().decode(errors="replace")
    if len(head) > _NRRD_HEADER_BYTES:
        raise ImageError(f"{path}: the NRRD header does not end within {_NRRD_HEADER_BYTES // 2**20} MiB; "
                         "the file is damaged — export the image again")
    return None


def _nifti_pair_files(path: Path) -> list[Path]:
    """The Analyze/NIfTI ``.hdr``/``.img`` files (any of them gzipped) that belong to ``path``; ITK's
    NIfTI reader finds the other half of a pair by this naming, in the header's folder."""
    lower = path.name.lower()
    suffix = next((s for s in _NIFTI_PAIR_SUFFIXES if lower.endswith(s)), None)
    if suffix is None:
        return []
    stem = path.name[: -len(suffix)]
    names = {stem + s for s in _NIFTI_PAIR_SUFFIXES} | {stem + s.upper() for s in _NIFTI_PAIR_SUFFIXES}
    return sorted(path.parent / name for name in names if name != path.name and os.path.lexists(path.parent / name))


def _detached_data(path: Path, io: str) -> tuple[str, str, list[Path] | None] | None:
    """(field, value, files) when ``path``'s voxels live in another file, else None.

    ``field`` names where the header says so, ``value`` what it says, ``files`` the paths it names, or
    None for a list or numbered pattern of files. ``io``: the ImageIO ITK will read the file with.
    """
    if io == "MetaImageIO":
        value = _metaimage_fields(path).get(b"elementdatafile")
        if value is None:  # MetaIO reads on past any limit; the field could hide there
            raise ImageError(f"{path}: no ElementDataFile in the first {_METAIMAGE_HEADER_BYTES // 1024} KiB of "
                             "the MetaImage header; the file is damaged — export the image again")
        value = value.decode(errors="replace")
        if value.upper() == "LOCAL":
            return None
        pattern = value.upper().startswith("LIST") or "%" in value
        return "ElementDataFile", value, None if pattern else [path.parent / value]
    if io == "NrrdImageIO":
        value = _nrrd_data_file(path)
        if value is None:
            return None
        pattern = value.upper().startswith("LIST") or "%" in value or len(value.split()) > 1
        return "data file", value, None if pattern else [path.parent / value]
    if io == "NiftiImageIO":
        pair = _nifti_pair_files(path)
        if pair or path.name.lower().endswith(_NIFTI_PAIR_SUFFIXES):
            return "Analyze/NIfTI pair file", " + ".join(p.name for p in pair) or "(none)", pair
    return None


def check_data_file(path: str | os.PathLike, allow_detached: bool = True) -> str:
    """Refuse a header whose voxels live in a file outside the header's own folder; -> the name of
    the ImageIO ITK reads ``path`` with (``NiftiImageIO``...), which a reader may be given so that it
    does not look for it again.

    MetaImage ``ElementDataFile``, NRRD ``data file`` and the ``.img`` of an Analyze/NIfTI ``.hdr``
    can name any file on the machine (``/etc/passwd``, ``../x``, or a symlink leading out); its bytes
    would be read as voxels and could leave in a result. A detached file is read only when it
    resolves into the header's folder; lists and numbered patterns of files are refused. With
    ``allow_detached=False`` (uploads, the web app's ``--data`` folder) any detached header is refused.
    """
    path = Path(path)
    with itk_file_name(path) as name:  # a name that is not UTF-8 would abort SimpleITK
        io = sitk.ImageFileReader.GetImageIOFromFileName(name)
    found = _detached_data(path, io)
    if found is None:
        return io
    field, value, files = found
    value = value[:120]
    if not allow_detached:
        raise ImageError(f"{path}: the header keeps its voxels in another file ({field} = {value}); only "
                         "single-file volumes are taken here — save it as .nii.gz, .nrrd or .mha with the data inside")
    if files is None:
        raise ImageError(f"{path}: {field} = {value} names a list or numbered pattern of files, which AttnSeg "
                         "does not read — save the volume as one file (.nii.gz, .nrrd or .mha)")
    folder = path.parent.resolve()
    if os.path.isabs(value) or any(file.resolve().parent != folder for file in files):
        raise ImageError(f"{path}: {field} = {value} points outside the header's folder (absolute path, "
                             "'..' or a symlink leading out); put the data file beside the header and name "
                             "it without a folder")
    return io


def _check_header(path: Path, dim: int, size, components: int, pixel_id: int, spacing, origin,
                  direction) -> None:
    """Refuse what AttnSeg cannot segment, from the header alone (before any voxel is read)."""
    if dim == 4:
        raise ImageError(f"{path}: 4D image {tuple(size)}; AttnSeg needs one 3D volume per modality — "
                         "split the channels/time points into separate files")
    if dim == 2 or (dim == 3 and 1 in size):
        raise ImageError(f"{path}: 2D image of size {tuple(size)}; AttnSeg segments 3D volumes — "
                         "give the whole series or volume, not one slice")
    if dim != 3:
        raise ImageError(f"{path}: {dim}D image; AttnSeg needs a 3D volume")
    if min(size) < 1:
        raise ImageError(f"{path}: empty image (size {tuple(size)}); the file holds no voxels")
    if pixel_id in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise ImageError(f"{path}: complex-valued image; give the magnitude image (real-valued) instead")
    if components > 1:
        raise ImageError(f"{path}: {components}-component (colour/vector) image; "
                         "give a scalar volume per modality")
    working_bytes = math.prod(size) * 4  # one float32 copy, the least any model frame needs
    if working_bytes > physical_memory_bytes():
        raise ImageError(f"{path}: a {'x'.join(map(str, size))} volume needs at least "
                         f"{working_bytes / 2**30:.1f} GiB to process, more than this machine's "
                         f"{physical_memory_bytes() / 2**30:.1f} GiB of memory; crop or downsample it first")
    spacing = np.asarray(spacing, dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ImageError(f"{path}: invalid voxel spacing {tuple(float(x) for x in spacing)}; fix the header")
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    if not (np.all(np.isfinite(matrix)) and np.all(np.isfinite(origin)) and abs(np.linalg.det(matrix)) > 1e-6):
        raise ImageError(f"{path}: the header's orientation (direction {tuple(direction)}, origin "
                         f"{tuple(origin)}) is degenerate; fix the header")
    gram = matrix.T @ matrix
    if np.abs(gram - np.diag(np.diag(gram))).max() > _SHEAR_TOLERANCE:
        unit = matrix / np.linalg.norm(matrix, axis=0)
        angles = [math.degrees(math.acos(np.clip(unit[:, a] @ unit[:, b], -1.0, 1.0))) for a, b in ((0, 1), (1, 2), (0, 2))]
        raise ImageError(f"{path}: the voxel axes are not perpendicular (a sheared grid: i-j {angles[0]:.1f}, j-k "
                         f"{angles[1]:.1f}, i-k {angles[2]:.1f} degrees), which the NIfTI results cannot hold; resample "
                         "the image onto a grid with perpendicular axes first")


def _check_dicom_slices(path: Path, files) -> None:
    """Refuse a DICOM series whose slices (``files``, in the reader's order) do not make one evenly spaced
    volume: two at one position (two echoes or phases in one series, or a file copied twice), which ITK
    interleaves into a volume of half the spacing, or a missing slice, which it stacks over as if the
    spacing were even (every slice beyond the gap then lies where it is not). Slices without a position
    and orientation (0020,0032 and 0020,0037) are left to the reader; ``files``' order is not relied on."""
    positions, normal = [], None
    reader = sitk.ImageFileReader()
    for file in files:
        reader.SetFileName(file)
        reader.ReadImageInformation()
        if not (reader.HasMetaDataKey("0020|0032") and reader.HasMetaDataKey("0020|0037")):
            return
        try:
            cosines = np.array([float(v) for v in reader.GetMetaData("0020|0037").split("\\")])
            position = np.array([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
        except ValueError:
            return
        if cosines.shape != (6,) or position.shape != (3,):
            return
        normal = np.cross(cosines[:3], cosines[3:]) if normal is None else normal
        positions.append(float(position @ normal))
    if len(positions) < 3:
        return
    positions = np.sort(positions)
    steps = np.diff(positions)
    usual = float(np.median(steps))
    if usual < _DICOM_SAME_POSITION_MM or steps.min() < _DICOM_SAME_POSITION_MM:
        twice = int(np.sum(steps < _DICOM_SAME_POSITION_MM))
        raise ImageError(f"{path}: the DICOM series has {twice} slice(s) at the position of another (two echoes or "
                         "phases in one series, or a file copied twice); put each volume's slices in a folder of its own")
    if steps.max() > _DICOM_GAP_FACTOR * usual:
        at = int(np.argmax(steps))
        raise ImageError(f"{path}: the DICOM series' slices are {usual:.2f} mm apart but {steps[at]:.2f} mm from "
                         f"{positions[at]:.2f} to {positions[at + 1]:.2f} mm along the slice normal (a slice missing, or "
                         "slices of unequal spacing); give the whole series")


_VOXEL_BYTES = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
                sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat32: 4, sitk.sitkFloat64: 8}


def _check_voxel_bytes(path: Path, size, pixel_id: int, max_voxel_bytes: int | None) -> None:
    """Refuse, from the header, a volume whose voxels take more than ``max_voxel_bytes`` as stored."""
    stored = math.prod(size) * _VOXEL_BYTES.get(pixel_id, 8)
    if max_voxel_bytes is not None and stored > max_voxel_bytes:
        raise ImageError(f"{path}: its {'x'.join(map(str, size))} voxels take {stored / 2**20:.1f} MiB unpacked, more "
                         f"than the {max_voxel_bytes / 2**20:.1f} MiB allowed here; crop or downsample it")


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def read_image(path: str | os.PathLike, max_voxel_bytes: int | None = None) -> Image:
    """Read a 3D image (NIfTI, NRRD, MHA/MHD, or a DICOM series folder) keeping its geometry.

    ``max_voxel_bytes``: refuse, before any voxel is read, a volume whose voxels take more bytes than
    this as stored (a server's bound on one upload: a gzipped file of a few MiB can unpack to GiB); a
    DICOM series is measured by its first file's slice times its number of files.

    Raises :class:`ImageError` for missing, unreadable, truncated or damaged files, 2D or 4D, vector
    or complex images, volumes too large for this machine, degenerate geometry, and folders holding
    no or several DICOM series, with a message that says what to do. The header is checked before
    any voxel is read.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            series = dicom_series(path)
            if not series:
                raise ImageError(f"{path}: folder holds no DICOM series; give an image file or a DICOM series folder")
            if len(series) > 1:
                raise ImageError(f"{path}: folder holds {len(series)} DICOM series; AttnSeg reads one series per "
                                 "folder — move each series into its own folder and give that folder")
            with itk_file_name(path) as name:
                files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(name, series[0])
                _check_dicom_slices(path, files)
                if max_voxel_bytes is not None:
                    first = sitk.ImageFileReader()
                    first.SetFileName(files[0])
                    first.ReadImageInformation()
                    _check_voxel_bytes(path, (*first.GetSize()[:2], len(files)), first.GetPixelID(), max_voxel_bytes)
                img = sitk.ReadImage(files)
        else:
            if path.name.lower().endswith((".mha", ".mhd")):
                _check_metaimage_header(path)
            io = check_data_file(path)
            with itk_file_name(path) as name:
                reader = sitk.ImageFileReader()
                reader.SetFileName(name)
                reader.SetImageIO(io)  # found once: each reader step would otherwise ask every ImageIO again
                reader.ReadImageInformation()
                _check_header(path, reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(),
                              reader.GetPixelID(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
                _check_voxel_bytes(path, reader.GetSize(), reader.GetPixelID(), max_voxel_bytes)
                if path.name.lower().endswith((".nii", ".nii.gz")):
                    _check_nifti_complete(path)
                img = reader.Execute()
    except RuntimeError as err:
        raise ImageError(
            f"{path}: not a readable medical image ({_reader_reason(err)}); the file may be damaged or in "
            "another format — use NIfTI, NRRD, MHA or a DICOM series folder"
        ) from None
    _check_header(path, img.GetDimension(), img.GetSize(), img.GetNumberOfComponentsPerPixel(),
                  img.GetPixelID(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    return Image.from_sitk(img)


def write_image(image: Image, path: str | os.PathLike, compression_level: int = 1) -> Path:
    """Write atomically: to a temporary file in the same folder, then rename over ``path``.

    A crash mid-write never leaves a truncated file at ``path``, and a failed write (full disk, lost
    permission) raises :class:`OSError` and leaves ``path`` as it was. ``compression_level`` 1 keeps
    gzip fast (the default level 6 triples write time for ~10 % smaller files); 0 stores uncompressed.
    ``.nii.gz`` is written by SimpleITK as plain NIfTI and gzipped with zlib's run-length strategy
    (see :func:`_gzip_file`), or stored in the gzip stream uncompressed where the voxels hold too few
    runs for that to pay (:func:`worth_deflating`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = _image_suffix(path.name) or path.suffix  # ".nii.gz" whole, also in "...nii.gz"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name if _is_utf8(path.name) else 'attnseg-image'}.", suffix=suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        if suffix == ".nii.gz":
            plain = Path(tmp[: -len(".gz")])
            try:
                _sitk_write(image, plain, path, False, 0)
                _gzip_file(plain, Path(tmp), compression_level if worth_deflating(image.array) else 0)
            finally:
                plain.unlink(missing_ok=True)
        else:
            _sitk_write(image, Path(tmp), path, True, compression_level)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a written image gets the user's usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read_umask() -> int:
    """The process umask (read once at import: setting it to read it is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def apply_umask(path: str | os.PathLike) -> None:
    """Give a file (or folder) the permissions the user's umask gives new ones (``rw-r--r--`` /
    ``rwxr-xr-x`` under umask 022): writers that create private temporary files or folders (safetensors,
    ``tempfile``) leave them 0600 / 0700, which a colleague sharing the folder could not read."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_UMASK)


def _sitk_write(image: Image, path: Path, target: Path, compress: bool, level: int) -> None:
    """SimpleITK's writer into ``path`` (on the way to ``target``), made to fail loudly: its NIfTI
    writer only prints a warning when the disk fills and leaves a short file, so a NIfTI is checked
    against its header after writing."""
    try:
        with itk_file_name(path) as name:
            sitk.WriteImage(image.to_sitk(), name, compress, level)
        if path.name.lower().endswith(".nii"):
            _check_nifti_complete(path)
    except (RuntimeError, ImageError) as err:
        reason = "the file came out truncated" if isinstance(err, ImageError) else _reader_reason(err)
        raise OSError(errno.EIO, f"could not write the image ({reason}); the disk may be full", str(target)) from None


def worth_deflating(array: np.ndarray) -> bool:
    """True when at least :data:`DEFLATE_MIN_RUN_FRACTION` of ``array``'s bytes repeat the byte before
    them: the only matches zlib's run-length strategy looks for (runs of zeros, of one label value).

    Below that, deflating is mostly Huffman coding of float noise, which saves little for most of the
    write's time; such a file is stored in the gzip stream as it is (level 0), still a ``.nii.gz``
    every reader opens. Measured (CPU time, one thread): the float32 probabilities and maps of the
    default model on a hippocampus crop (35x51x35) and on an 80x96x80 brain block hold 0.3-0.5 %
    repeated bytes; deflating made them 11-17 % smaller and took 2.5 to 4 times as long as storing
    them (crop: 31 ms for all five outputs against 16 ms; block: 203 ms against 63 ms). A label map
    (98-99 % repeated bytes, 50-60 times smaller deflated) stays deflated. At the threshold, the runs
    and the Huffman coding of the rest would save about a quarter. Counted a chunk at a time, so the
    scratch stays one chunk however large the volume.
    """
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    pairs = data.size - 1  # byte i + 1 against byte i
    repeated = 0
    for start in range(0, pairs, _GZIP_CHUNK_BYTES):
        stop = min(start + _GZIP_CHUNK_BYTES, pairs)
        repeated += int(np.count_nonzero(data[start + 1:stop + 1] == data[start:stop]))
    return pairs > 0 and repeated >= DEFLATE_MIN_RUN_FRACTION * pairs


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


def text_name(name: str) -> str:
    """``name`` as valid UTF-8 text, for a node name or a page: a file name's bytes that are not UTF-8
    (kept by Python as lone surrogates) become ``?``. VTK cannot take such a name (a node named so
    aborts the process), nor can msgpack send it to a browser."""
    return name.encode("utf-8", "replace").decode("utf-8")


def case_name(path: str | os.PathLike) -> str:
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


LABEL_MAP_MAX_LEVELS = 64  # a scan has hundreds of grey levels or more; a label map a handful


def label_map_levels(array: np.ndarray) -> int | None:
    """The number of distinct values when ``array`` looks like a label map or a segmentation
    (integer values only, at most ``LABEL_MAP_MAX_LEVELS`` of them), else None: an image to segment."""
    sample = array.ravel()[::97]  # a scan shows its many levels in a sparse sample already: no full pass
    if len(np.unique(sample)) > LABEL_MAP_MAX_LEVELS or (
            np.issubdtype(array.dtype, np.floating) and not np.array_equal(sample, np.round(sample))):
        return None
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        return None
    levels = np.unique(array)
    return int(len(levels)) if len(levels) <= LABEL_MAP_MAX_LEVELS else None
