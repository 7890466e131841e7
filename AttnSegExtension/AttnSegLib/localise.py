"""Whole-head input -> one box around each target structure, or the user's ROI; and results back.

A model trained on crops around one structure (the hippocampus packages: MSD Task04 crops of about
35x50x35 mm) answers nonsense on a whole head. When a card's ``inference.localisation`` says how, the
input is localised:

1. **Registration.** The shipped MNI152 template (ICBM 2009a symmetric, 2 mm; ``Resources/Atlas``) is
   registered to the first input by an affine, multi-resolution Mattes mutual-information registration
   (SimpleITK), restricted to the template's brain. Initialisation: centres of mass and the template
   shrunk to a usual head's size (:data:`REFERENCE_SCALE`), then a coarse search over translations of up
   to 24 mm, rotations of up to 30 degrees about each axis and scales 0.69-1.01 (at 8 mm).
   A registration that correlates less than :data:`SURE_CORRELATION` with the template (see the check
   below) is tried again from the template 15 % larger than its own size (a large head: scales 0.97-1.33
   searched), then with the metric
   restricted to the brain eroded by 4 mm (a head with its skull: see :data:`FALLBACK_EROSION_VOXELS`);
   the best is kept (:data:`ATTEMPTS`). The transform maps template (MNI, LPS) points to input (LPS) points.
2. **Check.** The registration is refused (:class:`LocalisationError`) when the input, brought into the
   template's frame, correlates poorly with the template deep inside its brain (the brain mask eroded by
   8 mm: the grey/white-matter pattern, not the brain's outline, which half a brain or an upside-down
   head also roughly fills), or when the affine is implausible (scales outside 0.7-1.4, a flip). After
   segmenting, a crop whose structure volume is implausible is refused too, and a structure whose box the
   scan covers only in part (its field of view ends across it) gets a notice (:func:`coverage_notice`).
3. **Crop.** Each target's MNI box centre is mapped into the input; the crop is a grid oriented along
   the template's axes as the registration sees them (the rotation of the affine, without its scaling:
   the pose the model was trained on) and *size-normalised*: its voxels are the model's spacing times
   the head's scale over :data:`REFERENCE_SCALE` (:attr:`Registration.size_factor`), and the model is
   shown them as voxels of its own spacing (:func:`crop_grids`), so every head's anatomy reaches the
   model at one size. (The models have a size prior: a crop cut at the patient's own size segments a
   larger head's hippocampus as relatively smaller, so a scaled copy of a scan gave another
   hippocampus.) It spans the model's training field of view in that frame, or the mapped box (the
   structure's extent plus a margin) when that is larger.
4. **Back.** Each crop is segmented by the package in its own frame; probabilities and maps are put back
   on the crop's sampled grid and resampled (linearly) onto the input grid inside the crop's footprint
   (volumes are so measured in the patient's millimetres); background everywhere else. Each target then
   contributes its own classes ("Left anterior hippocampus", ...).

A user ROI (:class:`Box` from :meth:`Box.from_centre_size`, LPS millimetres as ITK reads the file) is
cut from the input on its own grid (no interpolation) and pasted back the same way: at the scan's own
size, since no registration gives the head's. A box the localisation placed and the user moved keeps its
registration's size factor (the Slicer panel's ROIs) and is cropped and put back as in steps 3-4.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .image import Geometry, Image, ImageError

ATLAS_FOLDER = "Atlas"
TEMPLATE_FILE = "mni152_2009a_sym_t1_2mm.nii.gz"
BRAIN_MASK_FILE = "mni152_2009a_sym_brainmask_2mm.nii.gz"
METHOD = "mni152_affine"
WORKING_SPACING_MM = 2.0  # the template's; the input is smoothed and resampled to it before registering
# Pearson correlation of the template and the registered input deep inside the template's brain.
# Measured (README, "Refused"): good T1s 0.45-1.00 (the template, the two skull-stripped MS patients, three
# moved, scaled and resampled copies of each: 0.446 at the least); failures 0.28 at most (half a brain,
# the upper or lower half of a head, its front half, upside down, on its side, noise, an ellipsoid blob,
# the BraTS FLAIR, T1c and brain masks, a T2). The threshold lies midway. The correlation over the whole
# brain and over the medial temporal boxes alone were measured too and separate worse (they overlap).
MIN_CORRELATION = 0.36
INNER_EROSION_VOXELS = 4  # of the 2 mm brain mask: 8 mm
# A registration that fails the check is tried once more with its metric inside the brain eroded by
# 4 mm: a head with its skull puts bone and scalp fat where the skull-stripped template's brain mask
# overhangs a smaller brain, and the template's brain then grows into them (measured on a synthetic
# shell, README "A whole head").
FALLBACK_EROSION_VOXELS = 2
# The metric's sums are split across threads and added in thread order: another thread count moves the
# optimiser's path by rounding, the crops by a fraction of a millimetre and the volumes by up to 5 %.
# One thread makes the answer the same on every machine (it costs about a second).
REGISTRATION_THREADS = 1
SEARCH_TRANSLATION_MM = 12.0  # step of the initial translation search (two each way)
SEARCH_ROTATION_DEG = 15.0  # step of the initial rotation search (two each way)
SEARCH_SCALE_STEP = 0.08  # step of the initial scale search (two each way, around REFERENCE_SCALE)
MAX_ITERATIONS = 100  # per resolution level; the optimiser usually stops earlier, on a small step
SCALE_RANGE = (0.7, 1.4)  # per axis, template -> input: heads are not 30 % smaller or 40 % larger
# "Much larger" than the training field of view: longer than this factor along any axis.
FOV_FACTOR = 1.5
# A structure's box (TARGETS: its extent plus 2 mm on every side) less covered than this by the scan has
# lost more than its margin on a face (2 of 36 mm is 5.5 %); a scan ending at MNI z -12 mm, across the
# hippocampus, covered 69 % of each box and gave 0.67 and 0.99 ml against 2.74 and 2.89 ml for the whole head.
MIN_STRUCTURE_COVERAGE = 0.95
# Size normalisation (step 3): the model sees every head's anatomy at the size it has in a head this many
# times the template's (the affine's geometric mean scale). 0.85: the two MS patients' heads measure 0.853
# and 0.852 (the template, an average of brains scaled to MNI space, is larger than a single head), so their
# volumes stay what the models gave at their own size (README, "Moved copies"). The training heads' scale
# is not known (the MSD crops carry no whole head).
REFERENCE_SCALE = 0.85
# The registrations tried, in turn, until one reaches SURE_CORRELATION (the best is kept): (metric inside
# the brain eroded by FALLBACK_EROSION_VOXELS rather than the whole brain, the template's scale the initial
# search starts from). A usual head's size first (a head with its skull: README "Skull on"), then 1.15 (a
# head as large as the template or larger: the MNI152 head with 1.2 mm voxels, started at the usual size
# alone, passed the check at 0.376 with its boxes 20 mm off; with 1.0 as the second start, the best of
# three for a 1.3 times larger copy was 0.45, its z scale 0.98; from 1.15 both register where they are).
ATTEMPTS = ((False, REFERENCE_SCALE), (False, 1.15), (True, REFERENCE_SCALE))
# A registration this well correlated is not tried again. Good heads measure 0.45 (patient 19's T1) to
# 1.00, the large head above 0.376 before its retry; below this a scan pays up to three registrations.
SURE_CORRELATION = 0.4

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class LocalisationError(ImageError):
    """The input cannot be localised (or needs localising and the model cannot); one line with the fix."""


@dataclass(frozen=True)
class Target:
    """A structure a model segments, placed in MNI152 space.

    ``centre_ras_mm``: box centre, MNI RAS mm. ``size_mm``: box extent along MNI x, y, z (mm).
    ``volume_ml``: the range of plausible foreground volumes in one box (all the model's classes).
    ``terminology``: the structure's DICOM/SNOMED CT codes (category, type, type modifier).
    """

    name: str
    side: str
    structure: str
    centre_ras_mm: tuple[float, float, float]
    size_mm: tuple[float, float, float]
    volume_ml: tuple[float, float]
    terminology: dict


_HIPPOCAMPUS = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "5976009", "Hippocampus"]}
_LEFT, _RIGHT = ["SCT", "7771000", "Left"], ["SCT", "24028007", "Right"]
# Hippocampus boxes in MNI152 (ICBM 2009a symmetric) space, RAS mm. Centres: the AAL atlas's hippocampus
# centroids (Tzourio-Mazoyer et al., NeuroImage 2002: left -25.0, -20.7, -10.1; right 29.2, -19.8, -10.3),
# made symmetric for the symmetric template and moved onto the centroid the shipped models segment on the
# template itself (hippocampus_unet and hippocampus_difficulty_aware: -27.4, -21.9, -15.0 and 27.3, -21.9,
# -14.9). Extent: that segmentation's 1st-99th percentile voxels span 22 x 35 x 32 mm (x, y, z); the box
# is that plus 2 mm on every side. Plausible volumes: 0.5-8 ml per side (MSD Task04 holds 2.4-4.4 ml;
# severe atrophy halves it; less than 0.5 ml means the box missed the hippocampus).
TARGETS = {
    "left_hippocampus": Target("left_hippocampus", "Left", "hippocampus", (-27.0, -22.0, -15.0), (26.0, 39.0, 36.0),
                               (0.5, 8.0), {**_HIPPOCAMPUS, "typeModifier": _LEFT}),
    "right_hippocampus": Target("right_hippocampus", "Right", "hippocampus", (27.0, -22.0, -15.0), (26.0, 39.0, 36.0),
                                (0.5, 8.0), {**_HIPPOCAMPUS, "typeModifier": _RIGHT}),
}


# -- boxes ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    """A box in physical space: ``centre`` (LPS mm), ``size`` (mm along its own axes), ``axes`` (3x3,
    row-major; column c is the LPS direction of the box's axis c)."""

    centre: tuple[float, float, float]
    size: tuple[float, float, float]
    axes: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @classmethod
    def from_centre_size(cls, centre_lps, size_mm) -> "Box":
        """An axis-aligned LPS box, e.g. a user's ``--roi``."""
        centre, size = tuple(float(c) for c in centre_lps), tuple(float(s) for s in size_mm)
        if len(centre) != 3 or len(size) != 3 or not all(np.isfinite(centre + size)) or min(size) <= 0:
            raise ImageError(f"an ROI needs a finite centre (3 numbers) and 3 positive sizes in mm, got "
                             f"centre {centre}, size {size}")
        return cls(centre, size)

    @property
    def axes_matrix(self) -> np.ndarray:
        return np.asarray(self.axes, dtype=float).reshape(3, 3)

    def corners(self) -> np.ndarray:
        """(8, 3) LPS corners."""
        half = np.asarray(self.size) / 2
        signs = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)], dtype=float)
        return np.asarray(self.centre) + (signs * half) @ self.axes_matrix.T

    def contains(self, point_lps) -> bool:
        """Whether the LPS point lies inside the box (its faces included)."""
        local = self.axes_matrix.T @ (np.asarray(point_lps, dtype=float) - np.asarray(self.centre))
        return bool(np.all(np.abs(local) <= np.asarray(self.size) / 2 + 1e-6))

    @classmethod
    def from_dict(cls, values: dict) -> "Box":
        """The inverse of :meth:`as_dict`."""
        return cls(tuple(values["centre_lps_mm"]), tuple(values["size_mm"]), tuple(values["axes_lps"]))

    def as_dict(self) -> dict:
        return {"centre_lps_mm": [round(c, 2) for c in self.centre], "size_mm": [round(s, 2) for s in self.size],
                "axes_lps": [round(a, 4) for a in self.axes]}


def grid_in_box(box: Box, spacing, direction=None) -> Geometry:
    """A grid covering ``box`` with ``spacing`` (mm, per axis) whose axes are ``direction`` (3x3
    row-major; default the box's axes), centred on the box."""
    direction = box.axes_matrix if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
    spacing = np.asarray(spacing, dtype=float)
    size = np.maximum(1, np.ceil(np.asarray(box.size) / spacing - 1e-6)).astype(int)
    origin = np.asarray(box.centre) - direction @ (spacing * (size - 1) / 2)
    return Geometry(tuple(int(n) for n in size), tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                    tuple(float(d) for d in direction.ravel()))


def footprint(corners_lps: np.ndarray, outer: Geometry) -> tuple[slice, slice, slice] | None:
    """The (k, j, i) index slices of ``outer`` covering the (N, 3) LPS points' bounding box in its index
    space (None: no overlap)."""
    to_index = np.linalg.inv(outer.ijk_to_lps())
    corners = np.c_[np.asarray(corners_lps, dtype=float), np.ones(len(corners_lps))] @ to_index.T
    lo = np.maximum(np.floor(corners[:, :3].min(0)).astype(int), 0)
    hi = np.minimum(np.ceil(corners[:, :3].max(0)).astype(int) + 1, outer.size)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(lo[a]), int(hi[a])) for a in (2, 1, 0))


def sub_geometry(geometry: Geometry, index: tuple[slice, slice, slice]) -> Geometry:
    """The part of ``geometry`` that (k, j, i) slices ``index`` cut out."""
    start = np.array([index[2].start, index[1].start, index[0].start], dtype=float)
    origin = geometry.ijk_to_lps() @ np.append(start, 1.0)
    size = (index[2].stop - index[2].start, index[1].stop - index[1].start, index[0].stop - index[0].start)
    return Geometry(size, geometry.spacing, tuple(float(o) for o in origin[:3]), geometry.direction)


def reference_image(geometry: Geometry) -> sitk.Image:
    """An empty uint8 SimpleITK image on ``geometry``: the output grid of a ``sitk.Resample``."""
    image = sitk.Image(list(geometry.size), sitk.sitkUInt8)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def resample(channel: Image, grid: Geometry, default: float, interpolator=sitk.sitkLinear) -> np.ndarray:
    """A (D, H, W) image resampled onto ``grid`` (samples outside it get ``default``) -> float32 array."""
    source = channel.to_sitk()
    if source.GetPixelID() != sitk.sitkFloat32:
        source = sitk.Cast(source, sitk.sitkFloat32)
    moved = sitk.Resample(source, reference_image(grid), sitk.Transform(), interpolator, float(default), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(moved)


# -- field of view ------------------------------------------------------------------------------------
def extent_mm(geometry: Geometry) -> np.ndarray:
    """Physical extent (mm) of a grid along its own axes (i, j, k)."""
    return np.asarray(geometry.size) * np.asarray(geometry.spacing)


def much_larger(geometry: Geometry, field_of_view_mm) -> bool:
    """True when the grid is longer than ``FOV_FACTOR`` times the field of view along some axis
    (extents sorted, so the comparison does not depend on the axis order)."""
    return bool(np.any(np.sort(extent_mm(geometry)) > FOV_FACTOR * np.sort(np.asarray(field_of_view_mm, float))))


# -- registration -------------------------------------------------------------------------------------
def atlas_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parents[1] / "Resources" / ATLAS_FOLDER, here.parent / "Resources" / ATLAS_FOLDER):
        if (candidate / TEMPLATE_FILE).is_file():
            return candidate
    raise LocalisationError(f"the MNI152 template ({TEMPLATE_FILE}) is missing from Resources/{ATLAS_FOLDER}; "
                            "reinstall AttnSeg, or give the region with --roi")


@dataclass(frozen=True)
class Template:
    """The shipped template, read once: ``image`` (T1, float32), ``mask`` (its brain, uint8), ``inner``
    (that brain eroded by :data:`FALLBACK_EROSION_VOXELS`), ``core`` ((D, H, W) bool: the brain eroded
    by :data:`INNER_EROSION_VOXELS`, where the check correlates)."""

    image: sitk.Image
    mask: sitk.Image
    inner: sitk.Image
    core: np.ndarray


_TEMPLATE_CACHE: dict[str, Template] = {}


def load_template() -> Template:
    """The shipped template (:class:`Template`), read once."""
    folder = atlas_dir()
    key = str(folder)
    if key not in _TEMPLATE_CACHE:
        image = sitk.ReadImage(str(folder / TEMPLATE_FILE), sitk.sitkFloat32)
        mask = sitk.ReadImage(str(folder / BRAIN_MASK_FILE), sitk.sitkUInt8)
        inner = sitk.BinaryErode(mask, [FALLBACK_EROSION_VOXELS] * 3)
        core = sitk.GetArrayFromImage(sitk.BinaryErode(mask, [INNER_EROSION_VOXELS] * 3)) > 0
        _TEMPLATE_CACHE[key] = Template(image, mask, inner, core)
    return _TEMPLATE_CACHE[key]


def to_working_resolution(image: Image, spacing: float = WORKING_SPACING_MM) -> sitk.Image:
    """The input smoothed (Gaussian, to the target resolution) and resampled to ``spacing`` mm on its own
    axes: registration then costs the same for any input grid."""
    img = image.to_sitk()
    img = sitk.Cast(img, sitk.sitkFloat32)
    source = np.asarray(img.GetSpacing())
    sigma = np.sqrt(np.maximum(spacing**2 - source**2, 0.0)) / 2.355  # FWHM of the new voxel, less the old
    if np.any(sigma > 0):
        img = sitk.SmoothingRecursiveGaussian(img, [float(max(s, 1e-3)) for s in sigma])
    size = [max(1, int(round(n * s / spacing))) for n, s in zip(img.GetSize(), source)]
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    origin = np.asarray(img.GetOrigin()) + direction @ ((spacing - source) / 2)
    return sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, tuple(origin), (spacing,) * 3,
                         img.GetDirection(), float(sitk.GetArrayViewFromImage(img).min()), sitk.sitkFloat32)


@dataclass
class Registration:
    """``transform``: template (MNI, LPS mm) point -> input (LPS mm) point. ``correlation``: Pearson
    correlation of template and registered input in the core of the template's brain. ``scales``:
    singular values of the affine's matrix."""

    transform: sitk.Transform
    matrix: np.ndarray
    correlation: float
    scales: tuple[float, float, float]
    seconds: float
    iterations: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def rotation(self) -> np.ndarray:
        """The rotation nearest the affine's matrix (polar decomposition): the pose without scaling."""
        u, _, vt = np.linalg.svd(self.matrix)
        return u @ vt

    @property
    def head_scale(self) -> float:
        """The head's linear size relative to the template's: the geometric mean of :attr:`scales`."""
        return float(np.prod(self.scales)) ** (1 / 3)

    @property
    def size_factor(self) -> float:
        """How much larger than the model's voxels a crop's voxels are, in the patient's millimetres:
        the head's scale over :data:`REFERENCE_SCALE`."""
        return self.head_scale / REFERENCE_SCALE

    def map_point(self, lps) -> np.ndarray:
        return np.asarray(self.transform.TransformPoint(tuple(float(v) for v in lps)))

    def as_dict(self) -> dict:
        return {"method": METHOD, "correlation": round(self.correlation, 4),
                "scales": [round(s, 4) for s in self.scales],
                "size_factor": round(self.size_factor, 4), "seconds": round(self.seconds, 3),
                "matrix_lps": [round(float(v), 5) for v in self.matrix.ravel()],
                "translation_lps_mm": [round(float(v), 3) for v in self.map_point((0.0, 0.0, 0.0))]}


def _correlation(template: sitk.Image, mask: np.ndarray, moving: sitk.Image, transform: sitk.Transform) -> float:
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, template, transform, sitk.sitkLinear, 0.0))
    a, b = warped[mask], sitk.GetArrayViewFromImage(template)[mask]
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _initial_similarity(template: sitk.Image, mask: sitk.Image, moving: sitk.Image,
                        start_scale: float) -> sitk.Similarity3DTransform:
    """Centres of mass aligned, the template brought to ``start_scale``; then the best of translations
    of up to 24 mm (12 mm steps) along each axis, then of rotations of -30..30 degrees (15 degree steps)
    about each axis, then of scales of the start -16..+16 % (8 % steps); each by mutual information at
    8 mm inside ``mask``. The translations matter for a head with its skull, neck and shoulders, whose
    centre of mass lies 2-3 cm below its brain's; the start's scale for a head with its skull: a
    template brain at its own size overhangs a smaller head's brain into the skull and scalp, and the
    affine then grows into them (README "Skull on"), while a head as large as the template, started at
    a usual head's size, was placed 20 mm off (see :data:`ATTEMPTS`)."""
    centred = sitk.CenteredTransformInitializer(template, moving, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    similarity = sitk.Similarity3DTransform()
    similarity.SetCenter(centred.GetCenter())
    similarity.SetTranslation(centred.GetTranslation())
    similarity.SetScale(start_scale)
    versor = float(np.sin(np.deg2rad(SEARCH_ROTATION_DEG) / 2))  # a rotation's versor component
    # parameters: versor (3), translation (3, mm), scale; the exhaustive grid's step of each is its scale
    for steps, step_lengths in (([0, 0, 0, 2, 2, 2, 0], [1, 1, 1] + [SEARCH_TRANSLATION_MM] * 3 + [1]),
                                ([2, 2, 2, 0, 0, 0, 0], [versor] * 3 + [1, 1, 1, 1]),
                                ([0, 0, 0, 0, 0, 0, 2], [1] * 6 + [SEARCH_SCALE_STEP])):
        search = sitk.ImageRegistrationMethod()
        search.SetNumberOfThreads(REGISTRATION_THREADS)
        search.SetMetricAsMattesMutualInformation(32)
        search.SetMetricFixedMask(mask)
        search.SetMetricSamplingStrategy(search.NONE)
        search.SetInterpolator(sitk.sitkLinear)
        search.SetOptimizerAsExhaustive(steps, stepLength=1.0)
        search.SetOptimizerScales(step_lengths)
        search.SetShrinkFactorsPerLevel([4])
        search.SetSmoothingSigmasPerLevel([2])
        search.SetInitialTransform(similarity, inPlace=True)
        search.Execute(template, moving)
    return similarity


def register(image: Image) -> Registration:
    """Affine registration of the MNI152 template to ``image`` (see the module docstring)."""
    start = time.process_time()
    template = load_template()
    moving = to_working_resolution(image)
    best = None
    for inside_eroded_brain, start_scale in ATTEMPTS:
        metric_mask = template.inner if inside_eroded_brain else template.mask
        initial = _initial_similarity(template.image, metric_mask, moving, start_scale)
        affine, iterations = _affine(template.image, metric_mask, moving, initial)
        correlation = _correlation(template.image, template.core, moving, affine)
        if best is None or correlation > best[1]:
            best = (affine, correlation, iterations)
        if correlation >= SURE_CORRELATION:
            break
    affine, correlation, iterations = best
    matrix = np.asarray(affine.GetMatrix()).reshape(3, 3)
    scales = tuple(float(s) for s in np.linalg.svd(matrix, compute_uv=False))
    return Registration(affine, matrix, correlation, scales, time.process_time() - start, iterations)


def _affine(template: sitk.Image, mask: sitk.Image, moving: sitk.Image,
            initial: sitk.Similarity3DTransform) -> tuple[sitk.AffineTransform, int]:
    """The multi-resolution affine registration from ``initial``, its metric inside ``mask``."""
    affine = sitk.AffineTransform(3)
    affine.SetCenter(initial.GetCenter())
    affine.SetMatrix(initial.GetMatrix())
    affine.SetTranslation(initial.GetTranslation())
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(REGISTRATION_THREADS)
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricFixedMask(mask)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.15, 1)  # fixed seed: the same answer every run
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-3, MAX_ITERATIONS, relaxationFactor=0.5,
                                                    gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SetInitialTransform(affine, inPlace=True)
    method.Execute(template, moving)
    return affine, method.GetOptimizerIteration()


def check_registration(registration: Registration) -> None:
    """Refuse a registration that did not find a head like the template (see the module docstring)."""
    r = registration
    if r.correlation < MIN_CORRELATION:
        raise LocalisationError(
            f"could not find a brain in this image to localise the structures (the registered MNI152 template "
            f"correlates {r.correlation:.2f} with it inside the brain, at least {MIN_CORRELATION} is needed): it does "
            "not look like a whole-head T1 MRI the right way up; check the image, or give the region with --roi")
    if np.linalg.det(r.matrix) <= 0 or not all(SCALE_RANGE[0] <= s <= SCALE_RANGE[1] for s in r.scales):
        raise LocalisationError(
            f"the registration to the MNI152 template gave an implausible head (scales {', '.join(f'{s:.2f}' for s in r.scales)}, "
            f"allowed {SCALE_RANGE[0]}-{SCALE_RANGE[1]}); check the image's orientation, or give the region with --roi")


def structure_box(registration: Registration, target: Target, orientation_direction: np.ndarray) -> Box:
    """``target``'s own box (the structure's extent plus its margin, :data:`TARGETS`) in the input: centred
    on the mapped MNI centre, oriented along the registration's rotation of ``orientation_direction`` (the
    model's axes), scaled by the affine."""
    centre = registration.map_point(_LPS_TO_RAS @ np.asarray(target.centre_ras_mm))
    axes = registration.rotation @ orientation_direction
    # the target's extent along the model's axes, in the patient's millimetres
    box_mm = np.abs(orientation_direction.T @ _LPS_TO_RAS) @ np.asarray(target.size_mm)
    return Box(tuple(float(c) for c in centre), tuple(float(s) for s in box_mm * registration.head_scale),
               tuple(float(a) for a in axes.ravel()))


def target_box(registration: Registration, target: Target, crop_mm, orientation_direction: np.ndarray) -> Box:
    """The crop around ``target`` in the input: its :func:`structure_box`, widened to ``crop_mm`` times the
    registration's size factor (the training field of view in the size-normalised frame) where that is
    larger."""
    structure = structure_box(registration, target, orientation_direction)
    size = np.maximum(np.asarray(crop_mm, dtype=float) * registration.size_factor, structure.size)
    return Box(structure.centre, tuple(float(s) for s in size), structure.axes)


def coverage_notice(registration: Registration, target: Target, orientation: str | None, geometry: Geometry) -> str | None:
    """A notice when less than :data:`MIN_STRUCTURE_COVERAGE` of ``target``'s :func:`structure_box` lies
    inside the image of ``geometry`` (the scan ends across the structure: its volume comes out too small),
    else None."""
    covered = covered_fraction(structure_box(registration, target, orientation_matrix(orientation)), geometry)
    if covered >= MIN_STRUCTURE_COVERAGE:
        return None
    return (f"only {covered:.0%} of the {target.side.lower()} {target.structure}'s box lies inside the scan (its field "
            f"of view ends across it): the segmentation misses the rest and its volume is too small — give a scan "
            f"that covers the whole {target.structure}")


def covered_fraction(box: Box, geometry: Geometry, samples: int = 16) -> float:
    """The share of ``box``'s volume inside the image of ``geometry`` (its voxels' extent), measured on a
    ``samples``-cubed grid of points spread evenly through the box."""
    steps = (np.arange(samples) + 0.5) / samples - 0.5
    local = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3) * np.asarray(box.size)
    points = np.asarray(box.centre) + local @ box.axes_matrix.T
    index = (points - np.asarray(geometry.origin)) @ np.linalg.inv(geometry.ijk_to_lps()[:3, :3]).T
    inside = np.all((index >= -0.5) & (index <= np.asarray(geometry.size) - 0.5), axis=1)
    return float(inside.mean())


def crop_grids(box: Box, spacing, size_factor: float) -> tuple[Geometry, Geometry]:
    """(sampled, shown): the grid a crop is sampled on in the input (``spacing`` times ``size_factor``
    mm, along the box's axes), and the same voxels as the model is shown them (``spacing`` mm, so the
    anatomy has the reference size). Arrays on one are arrays on the other, voxel for voxel."""
    sampled = grid_in_box(box, np.asarray(spacing, dtype=float) * size_factor, box.axes)
    return sampled, Geometry(sampled.size, tuple(float(s) for s in spacing), sampled.origin, sampled.direction)


def needs_localisation(geometry: Geometry, card: dict) -> bool:
    """True when ``card`` says how to localise its structures (``inference.localisation``) and a grid of
    ``geometry`` is much larger than the field of view the model was trained on."""
    settings = card.get("inference", {})
    field_of_view = settings.get("training_field_of_view_mm")
    return bool(settings.get("localisation") and field_of_view and much_larger(geometry, field_of_view))


def localise_targets(image: Image, card: dict) -> tuple[Registration, list[tuple[Target, Box]]]:
    """Register the template to ``image`` (refused when implausible) and place the crop box of each
    target ``card``'s ``inference.localisation`` names, without segmenting: (registration, [(target,
    box)]) in the targets' order (see the module docstring, steps 1-3)."""
    settings = card.get("inference", {})
    localisation = settings.get("localisation")
    if not localisation:
        raise LocalisationError(f"model {card.get('name', '')!r} has no localisation in its card; give the region "
                                "yourself (an ROI, or --roi)")
    registration = register(image)
    check_registration(registration)
    targets = resolve_targets(localisation.get("targets", []))
    field_of_view = settings.get("training_field_of_view_mm") or (0.0, 0.0, 0.0)
    direction = orientation_matrix(card.get("orientation"))
    return registration, [(t, target_box(registration, t, field_of_view, direction)) for t in targets]


def orientation_matrix(orientation: str | None) -> np.ndarray:
    """3x3 LPS direction of a grid in ``orientation`` (e.g. RAS), as ITK's DICOMOrient sets it."""
    if not orientation:
        return np.eye(3)
    return np.asarray(sitk.DICOMOrient(sitk.Image([2, 2, 2], sitk.sitkUInt8), orientation).GetDirection()).reshape(3, 3)


# -- crops out, results back ---------------------------------------------------------------------------
def crop_images(images: list[Image], grid: Geometry) -> list[Image]:
    """Every modality resampled onto ``grid`` (linear; outside the input: the input's minimum)."""
    return [Image(resample(img, grid, float(img.array.min())), grid) for img in images]


def cut(images: list[Image], index: tuple[slice, slice, slice]) -> list[Image]:
    """Every modality cut to the (k, j, i) slices ``index`` of its own grid (no interpolation)."""
    geometry = sub_geometry(images[0].geometry, index)
    return [Image(np.ascontiguousarray(img.array[index]), geometry) for img in images]


def resolve_targets(names) -> list[Target]:
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise LocalisationError(f"the model card names unknown localisation target(s) {', '.join(unknown)}; known: "
                                f"{', '.join(TARGETS)}; update AttnSeg")
    return [TARGETS[n] for n in names]


def target_classes(card_classes: list[dict], targets: list[Target]) -> list[dict]:
    """The classes of a localised result: background, then each target's copy of the card's foreground
    classes ("Left anterior hippocampus"), with the target's side, part and terminology."""
    classes = [dict(card_classes[0], value=0)]
    for target in targets:
        for cls in card_classes[1:]:
            classes.append({"value": len(classes), "name": target_class_name(target, cls["name"]),
                            "color": list(cls.get("color", (255, 255, 0))), "terminology": target.terminology,
                            "target": target.name, "side": target.side, "part": cls["name"]})
    return classes


def target_class_name(target: Target, part: str) -> str:
    """The name of a card class ``part`` in ``target``'s copy: "Left anterior hippocampus"."""
    return f"{target.side} {part.lower()} {target.structure}"


def class_target(cls: dict, parts: list[str]) -> tuple[Target, str] | None:
    """(target, card class name) of a localised result's class, from its ``target`` and ``part`` or else
    from its name (a front end may keep only names); None for a class of no target (background, or a
    result that was not localised). ``parts``: the card's class names."""
    if cls.get("target") in TARGETS and cls.get("part"):
        return TARGETS[cls["target"]], cls["part"]
    for target in TARGETS.values():
        for part in parts:
            if cls["name"].lower() == target_class_name(target, part).lower():
                return target, part
    return None


def plausible_volume(labels: np.ndarray, voxel_ml: float, target: Target) -> float:
    """The foreground volume (ml) of a localised crop's (D, H, W) labels; refused when outside the
    target's plausible range (the registration then put the box somewhere else)."""
    volume = float(np.count_nonzero(labels)) * voxel_ml
    low, high = target.volume_ml
    if not low <= volume <= high:
        raise LocalisationError(
            f"the localised box for the {target.side.lower()} {target.structure} holds {volume:.2f} ml of it, not a "
            f"plausible {low}-{high} ml: the registration likely missed it; check the image, or give the region "
            "with --roi")
    return volume


def volumetry(labels: Image, classes: list[dict]) -> dict | None:
    """ml per side and part and the left/right asymmetry index, for a result whose classes carry a
    ``side`` and ``part`` (a localised one); None otherwise.

    Asymmetry index (%): 100 * (left - right) / ((left + right) / 2), per part and in total.
    """
    if not any("side" in c for c in classes):
        return None
    counts = np.bincount(labels.array.ravel(), minlength=len(classes))
    voxel = labels.geometry.voxel_volume_ml
    sides: dict[str, dict[str, float]] = {}
    for cls in classes[1:]:
        if "side" in cls:
            part = sides.setdefault(cls["side"], {})
            part[cls["part"]] = round(float(counts[cls["value"]]) * voxel, 4)
    for parts in sides.values():
        parts["total"] = round(sum(parts.values()), 4)
    out: dict = {"unit": "ml", **sides}
    if "Left" in sides and "Right" in sides:
        out["asymmetry_index_percent"] = {
            part: (round(100 * (sides["Left"][part] - sides["Right"][part]) /
                         ((sides["Left"][part] + sides["Right"][part]) / 2), 2)
                   if sides["Left"][part] + sides["Right"][part] > 0 else None)
            for part in sides["Left"]}
    return out
