"""Interactive correction: clicks in, class probabilities updated around each click, the rest untouched.

A click is a point in the image's physical LPS space (mm, as ITK reads it) and a class: ``k`` means
"this belongs to class k" (a positive click), ``0`` (``background``) means "nothing here" (a negative
click); a short scribble is a run of clicks of one class. Each new click updates the probabilities in
its neighbourhood only: with weight 1 up to :data:`FULL_UPDATE_MM` from the click, falling linearly to 0
at :data:`RADIUS_MM`, so no voxel farther than ``RADIUS_MM`` from every click changes. Labels and the
uncertainty map (normalised entropy) are recomputed where the probabilities moved.

Three updates (``method``):

* ``learned``: a refinement network (a shipped package whose card has ``"purpose": "refinement"``) reads
  a 32-voxel cube around the click in its own frame (orientation and spacing of its card): the image,
  the current class probabilities and one Gaussian click map per class, and returns new probabilities.
* ``random_walker``: a random walker with priors (Grady 2005/2006) on the image in a box around the
  click. Seeds: the clicks, and the voxels the network is sure of (uncertainty below
  :data:`SURE_UNCERTAINTY`) outside :data:`FREE_RADIUS_MM` of the new click; the network's probabilities
  are the prior of the rest, so the doubt map decides what the click may move.
* ``sphere``: paint a ball of :data:`PAINT_RADIUS_MM` around the click with its class.

Arrays follow :mod:`AttnSegLib.image`: (D, H, W) = (k, j, i); probabilities (C, D, H, W) float32.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.nn.functional as F
from scipy import ndimage

from .errors import AttnSegError
from .image import Geometry, Image, label_dtype
from .inference import Result
from .localise import Box, class_target
from .maps import normalized_entropy
from .package import CARD_FILE, ModelPackage, PackageError, load_package, search_dirs

RADIUS_MM = 15.0        # no voxel farther than this from every click changes
FULL_UPDATE_MM = 10.0   # within this the update replaces the old probabilities; linear fall-off beyond
PAINT_RADIUS_MM = 3.0   # the ball the ``sphere`` method paints
FREE_RADIUS_MM = 3.0    # random walker: the network's sure voxels nearer the click than this are not seeds
SURE_UNCERTAINTY = 0.5  # random walker: voxels below this uncertainty keep their label as seeds
CLICK_SIGMA_MM = 3.0    # learned: width of the Gaussian click maps
CROP_VOXELS = 32        # learned: the cube the network sees, in its frame, when the card gives no patch_size_dhw
WARM_UP_RUNS = 2        # learned: runs on zeros before the first click (torch's first calls at a shape are slow)
METHODS = ("learned", "random_walker", "sphere")
DEFAULT_METHOD = "learned"
PURPOSE = "refinement"  # the card key "purpose" of a refinement package
REFINEMENT_DIR = "refinement"


class ClickError(AttnSegError, ValueError):
    """A click cannot be used (outside the image, unknown class, malformed); the message says why."""


@dataclass(frozen=True)
class Click:
    """``position_lps``: (x, y, z) mm in the image's physical LPS space; ``label``: class index, 0 =
    background (a negative click)."""

    position_lps: tuple[float, float, float]
    label: int


@dataclass
class Refined:
    """The corrected result on the input grid. ``probabilities`` (C, D, H, W) float32, ``labels``
    (D, H, W) uint8 (uint16 beyond 256 classes), ``uncertainty`` (D, H, W) float32; ``changed``:
    (D, H, W) bool, the voxels whose probabilities moved; ``seconds``: wall time of the update."""

    probabilities: np.ndarray
    labels: np.ndarray
    uncertainty: np.ndarray
    changed: np.ndarray
    seconds: float


# -- clicks ----------------------------------------------------------------------------------------
def class_index(name: str, class_names: list[str]) -> int:
    """A class name of the card (case-insensitive) or ``background`` -> its index."""
    lowered = [c.lower() for c in class_names]
    if name.strip().lower() in lowered:
        return lowered.index(name.strip().lower())
    raise ClickError(f"unknown class {name!r}; choose one of {', '.join(class_names[1:])} or background")


def parse_click(text: str, class_names: list[str]) -> Click:
    """``"X,Y,Z,CLASS"`` (mm, LPS) -> :class:`Click`."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 4:
        raise ClickError(f"click {text!r}: write X,Y,Z,CLASS (mm in the image's LPS space, then a class "
                         "name or background)")
    try:
        position = tuple(float(p) for p in parts[:3])
    except ValueError:
        raise ClickError(f"click {text!r}: X, Y and Z must be numbers (mm)") from None
    if not all(math.isfinite(v) for v in position):
        raise ClickError(f"click {text!r}: X, Y and Z must be finite numbers (mm)")
    return Click(position, class_index(parts[3], class_names))


def click_voxel(click: Click, geometry: Geometry) -> np.ndarray:
    """The click's continuous array index (k, j, i); :class:`ClickError` when outside the image, which
    spans [-0.5, n - 0.5) along each axis (the far face is on no voxel: rounded half to even, it would
    be index n when n is even)."""
    ijk = np.linalg.solve(geometry.ijk_to_lps(), np.append(click.position_lps, 1.0))[:3]
    size = np.asarray(geometry.size, dtype=float)
    if np.any(ijk < -0.5) or np.any(ijk >= size - 0.5):
        x, y, z = click.position_lps
        lo, hi = geometry.corners_lps().min(axis=0), geometry.corners_lps().max(axis=0)
        raise ClickError(f"click at ({x:g}, {y:g}, {z:g}) mm is outside the image, which spans "
                         f"x {lo[0]:.1f}..{hi[0]:.1f}, y {lo[1]:.1f}..{hi[1]:.1f}, z {lo[2]:.1f}..{hi[2]:.1f} mm "
                         "(LPS); give a point inside it")
    return ijk[::-1]


def voxel_click(index, label: int, geometry: Geometry) -> Click:
    """A click at array index (k, j, i) of ``geometry``."""
    k, j, i = (float(v) for v in index)
    return Click(tuple(float(v) for v in (geometry.ijk_to_lps() @ [i, j, k, 1.0])[:3]), int(label))


def simulated_click(labels: np.ndarray, truth: np.ndarray, spacing_dhw) -> tuple[tuple[int, int, int], int] | None:
    """The standard simulated user: the deepest interior point (maximum of the distance transform, mm)
    of the largest connected error component, with the true class there (0: a false region, clicked
    as background). ``None`` when there is no error. (D, H, W) arrays; ``spacing_dhw`` mm."""
    errors = labels != truth
    if not errors.any():
        return None
    components, count = ndimage.label(errors)
    largest = np.bincount(components.ravel(), minlength=count + 1)[1:].argmax() + 1
    region = np.pad(components == largest, 1)  # the image edge counts as the region's border
    depth = ndimage.distance_transform_edt(region, sampling=spacing_dhw)[1:-1, 1:-1, 1:-1]
    index = np.unravel_index(int(depth.argmax()), depth.shape)
    return tuple(int(v) for v in index), int(truth[index])


# -- neighbourhoods --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Neighbourhood:
    """The box around one click on the input grid and the update weight of each voxel in it.

    ``box``: slices (D, H, W); ``weight``: (d, h, w) in [0, 1], 1 up to FULL_UPDATE_MM, 0 from RADIUS_MM on;
    ``distance``: (d, h, w) mm to the click."""

    box: tuple[slice, slice, slice]
    weight: np.ndarray
    distance: np.ndarray

    @classmethod
    def around(cls, voxel: np.ndarray, spacing_dhw: np.ndarray, shape) -> "Neighbourhood":
        half = np.ceil(RADIUS_MM / spacing_dhw).astype(int)
        centre = np.round(voxel).astype(int)
        box = tuple(slice(max(0, c - h), min(n, c + h + 1)) for c, h, n in zip(centre, half, shape))
        grids = np.meshgrid(*[(np.arange(s.start, s.stop) - v) * sp for s, v, sp in zip(box, voxel, spacing_dhw)],
                            indexing="ij", sparse=True)
        distance = np.sqrt(sum(g ** 2 for g in grids)).astype(np.float32)
        weight = np.clip((RADIUS_MM - distance) / (RADIUS_MM - FULL_UPDATE_MM), 0.0, 1.0)
        return cls(box, weight, distance)


def click_maps(shape, origin, spacing_dhw, clicks: list[tuple[np.ndarray, int]], classes: int,
               sigma_mm: float = CLICK_SIGMA_MM) -> np.ndarray:
    """(C, *shape) Gaussian click maps: channel c is the maximum over clicks of class c of
    exp(-d^2 / 2 sigma^2), d the distance (mm) to the click. ``origin``: the array index of the box's
    first voxel; ``clicks``: (continuous array index, class) pairs."""
    maps = np.zeros((classes, *shape), dtype=np.float32)
    for voxel, label in clicks:
        grids = np.meshgrid(*[(np.arange(n) + o - v) * sp for n, o, v, sp in zip(shape, origin, voxel, spacing_dhw)],
                            indexing="ij", sparse=True)
        squared = sum(g ** 2 for g in grids)
        np.maximum(maps[label], np.exp(-squared / (2 * sigma_mm ** 2)), out=maps[label])
    return maps


# -- updates ---------------------------------------------------------------------------------------
def paint_sphere(probabilities: np.ndarray, distance: np.ndarray, label: int) -> np.ndarray:
    """(C, d, h, w) -> a copy with the ball of PAINT_RADIUS_MM around the click set to ``label``."""
    out = probabilities.copy()
    ball = distance <= PAINT_RADIUS_MM
    out[:, ball] = 0.0
    out[label, ball] = 1.0
    return out


def random_walker(image: np.ndarray, probabilities: np.ndarray, seeds: np.ndarray, spacing_dhw,
                  beta: float = 10.0, prior_weight: float = 0.5) -> np.ndarray:
    """Random walker with priors on a box.

    ``image`` (M, d, h, w); ``probabilities`` (C, d, h, w), the prior; ``seeds`` (d, h, w) int, class
    index or -1 for free voxels. Edge weights exp(-beta * |dI|^2 / var) over the 6-neighbourhood
    (divided by the voxel distance); for each class, the free voxels solve
    (L_ff + g I) x_f = -L_fs x_s + g p_f. -> (C, d, h, w) probabilities.
    """
    shape = seeds.shape
    n = seeds.size
    flat_index = np.arange(n).reshape(shape)
    scaled = image / (image.std(axis=(1, 2, 3), keepdims=True) + 1e-6)
    rows, cols, weights = [], [], []
    for axis in range(3):
        front = [slice(None)] * 3
        back = [slice(None)] * 3
        front[axis], back[axis] = slice(1, None), slice(None, -1)
        diff = ((scaled[(slice(None), *front)] - scaled[(slice(None), *back)]) ** 2).sum(axis=0)
        w = np.exp(-beta * diff) / float(spacing_dhw[axis])
        rows.append(flat_index[tuple(front)].ravel())
        cols.append(flat_index[tuple(back)].ravel())
        weights.append(w.ravel())
    rows, cols, weights = np.concatenate(rows), np.concatenate(cols), np.concatenate(weights) + 1e-6
    adjacency = scipy.sparse.coo_matrix((weights, (rows, cols)), shape=(n, n)).tocsr()
    adjacency = adjacency + adjacency.T
    laplacian = scipy.sparse.diags(np.asarray(adjacency.sum(axis=1)).ravel()) - adjacency
    seeds_flat = seeds.ravel()
    free = np.flatnonzero(seeds_flat < 0)
    fixed = np.flatnonzero(seeds_flat >= 0)
    out = np.zeros_like(probabilities).reshape(len(probabilities), -1)
    out[seeds_flat[fixed], fixed] = 1.0
    if len(free):
        laplacian = laplacian.tocsr()
        system = (laplacian[free][:, free] + prior_weight * scipy.sparse.identity(len(free))).tocsc()
        coupling = laplacian[free][:, fixed]
        solve = scipy.sparse.linalg.factorized(system)
        prior = probabilities.reshape(len(probabilities), -1)[:, free]
        for c in range(len(probabilities)):
            rhs = -(coupling @ out[c, fixed]) + prior_weight * prior[c]
            out[c, free] = solve(rhs)
    out = np.clip(out, 0.0, None)
    out /= out.sum(axis=0, keepdims=True) + 1e-12
    return out.reshape(probabilities.shape).astype(np.float32)


def walker_seeds(probabilities: np.ndarray, uncertainty: np.ndarray, distance: np.ndarray,
                 clicks: list[tuple[np.ndarray, int]], origin, spacing_dhw) -> np.ndarray:
    """(d, h, w) seeds for :func:`random_walker`: the network's sure labels outside FREE_RADIUS_MM of the
    new click (whose ``distance`` map is given), the box's faces, and a 1.5 mm ball at every click."""
    seeds = np.where((uncertainty < SURE_UNCERTAINTY) & (distance > FREE_RADIUS_MM),
                     probabilities.argmax(axis=0), -1).astype(np.int64)
    labels = probabilities.argmax(axis=0)
    for axis in range(3):
        for end in (0, -1):
            face = [slice(None)] * 3
            face[axis] = end
            seeds[tuple(face)] = labels[tuple(face)]
    for voxel, label in clicks:
        grids = np.meshgrid(*[(np.arange(n) + o - v) * sp for n, o, v, sp in
                              zip(seeds.shape, origin, voxel, spacing_dhw)], indexing="ij", sparse=True)
        seeds[sum(g ** 2 for g in grids) <= 1.5 ** 2] = label
    return seeds


class LearnedUpdate:
    """A refinement network run on a cube of ``size`` voxels around a click, in the frame of its ``card``.

    ``size`` is the card's ``patch_size_dhw`` (a cube; CROP_VOXELS when absent). The card's
    ``orientation`` (e.g. ``RAS``) and ``spacing_xyz_mm`` define the frame: the crop is taken on the input
    grid (physical size ``size`` * spacing), its axes permuted and flipped to the card's orientation and
    resized to ``size``^3 when the spacing differs; the output goes back the same way. Voxels of the
    update box outside the crop keep their probabilities.
    """

    def __init__(self, network: torch.nn.Module, card: dict, device: str = "cpu"):
        self.device = torch.device(device)
        self.network = network.eval().to(self.device)
        self.spacing_dhw = np.asarray(card.get("spacing_xyz_mm") or (1.0, 1.0, 1.0), dtype=float)[::-1]
        self.orientation = card.get("orientation") or "RAS"
        self.size = int((card.get("patch_size_dhw") or [CROP_VOXELS])[0])
        self.class_names = [c["name"] for c in card.get("classes", [])]
        self.modalities = len(card.get("modalities") or [None])

    @classmethod
    def from_package(cls, package: ModelPackage, device: str = "cpu") -> "LearnedUpdate":
        return cls(package.build_network(), package.card, device)

    def crop(self, geometry: Geometry, voxel: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[int, bool]]]:
        """(start index, extent on the input grid, frame axes) of the crop around ``voxel``."""
        spacing = np.asarray(geometry.spacing, dtype=float)[::-1]
        frame = frame_axes(geometry.direction, self.orientation)
        extent = np.empty(3, dtype=int)
        for frame_axis, (input_axis, _) in enumerate(frame):
            extent[input_axis] = max(2, round(self.size * self.spacing_dhw[frame_axis] / spacing[input_axis]))
        return np.round(voxel).astype(int) - extent // 2, extent, frame

    def reach(self, geometry: Geometry, voxel: np.ndarray) -> tuple[slice, slice, slice]:
        """The crop around ``voxel`` as array slices (D, H, W), clipped at index 0 (slicing clips the far
        side): the voxels the network reads."""
        start, extent, _ = self.crop(geometry, voxel)
        return tuple(slice(max(0, int(a)), max(0, int(a + e))) for a, e in zip(start, extent))

    def warm_up(self, runs: int = WARM_UP_RUNS) -> None:
        """Run the network ``runs`` times on an input of zeros of the crop's shape, (1, M + 2C, size,
        size, size): torch's first calls at a shape cost several times the later ones (0.33 and 0.17 s
        against 0.06 to 0.09 s on one CPU thread, 24^3), which would otherwise fall on the first clicks."""
        classes = len(self.class_names)
        x = torch.zeros((1, self.modalities + 2 * classes, *(self.size,) * 3), device=self.device)
        with torch.inference_mode():
            for _ in range(runs):
                refined_probabilities(self.network, x, classes)

    def inputs(self, image: np.ndarray, probabilities: np.ndarray, geometry: Geometry, voxel: np.ndarray,
               clicks: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, np.ndarray, list[tuple[int, bool]]]:
        """-> ((1, M + 2C, size, size, size) network input, crop start, frame axes)."""
        start, extent, frame = self.crop(geometry, voxel)
        spacing = np.asarray(geometry.spacing, dtype=float)[::-1]
        stacked = network_input(image, probabilities, clicks, start, extent, spacing)
        x = torch.from_numpy(to_frame(stacked, frame))[None]
        if tuple(x.shape[2:]) != (self.size,) * 3:
            x = F.interpolate(x, size=(self.size,) * 3, mode="trilinear", align_corners=False)
        return x, start, frame

    def __call__(self, image: np.ndarray, probabilities: np.ndarray, geometry: Geometry, voxel: np.ndarray,
                 clicks: list[tuple[np.ndarray, int]], box: tuple[slice, slice, slice],
                 parts: np.ndarray | None = None) -> np.ndarray:
        """-> (C, *box shape) new probabilities on the input grid over ``box``.

        ``parts`` (C,) int: the network's class of each of the C result classes (a localised whole head
        has a left and a right copy of each class, see :func:`class_parts`); None: the same classes."""
        if parts is not None:
            start, extent, _ = self.crop(geometry, voxel)  # the crop and the box, where the network's classes are read
            region = tuple(slice(max(0, min(a, s.start)), max(a + e, s.stop)) for a, e, s in zip(start, extent, box))
            full = probabilities
            probabilities = np.zeros((len(self.class_names), *full.shape[1:]), dtype=np.float32)
            probabilities[(slice(None), *region)] = merge_parts(full[(slice(None), *region)], parts,
                                                                len(self.class_names))
            clicks = [(v, int(parts[label])) for v, label in clicks]
        x, start, frame = self.inputs(image, probabilities, geometry, voxel, clicks)
        _, extent, _ = self.crop(geometry, voxel)
        with torch.inference_mode():
            out = refined_probabilities(self.network, x.to(self.device), probabilities.shape[0])
        native = tuple(extent[a] for a, _ in frame)
        if tuple(out.shape[2:]) != native:
            out = F.interpolate(out, size=native, mode="trilinear", align_corners=False)
        crop = from_frame(out[0].float().cpu().numpy(), frame)
        proposal = probabilities[(slice(None),) + box].copy()
        lo = [max(s.start, a) for s, a in zip(box, start)]
        hi = [min(s.stop, a + e) for s, a, e in zip(box, start, extent)]
        if all(h > l for l, h in zip(lo, hi)):
            into = tuple(slice(l - s.start, h - s.start) for l, h, s in zip(lo, hi, box))
            take = tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, start))
            proposal[(slice(None),) + into] = crop[(slice(None),) + take]
        if parts is None:
            return proposal
        # each result class gets its network class's probability, shared as the classes of that part shared it
        current = full[(slice(None),) + box]
        totals = merge_parts(current, parts, proposal.shape[0])
        share = current / np.maximum(totals[parts], 1e-12)
        mass = current.sum(axis=(1, 2, 3))
        for part in np.unique(parts):  # where a part had nothing, it goes to its class holding most in the box
            members = np.flatnonzero(parts == part)
            best = members[mass[members].argmax()]
            share[best][totals[part] == 0] = 1.0
        return (proposal[parts] * share).astype(np.float32)


def frame_axes(direction, orientation: str) -> list[tuple[int, bool]]:
    """For each array axis (D, H, W) of the frame with ``orientation`` (``RAS``: i towards R, j towards
    A, k towards S): (the input array axis it comes from, whether it is reversed). The nearest axis
    permutation: an oblique grid is treated as its closest axis-aligned one."""
    lps_of = {"R": (0, -1), "L": (0, 1), "A": (1, -1), "P": (1, 1), "S": (2, 1), "I": (2, -1)}
    columns = np.asarray(direction, dtype=float).reshape(3, 3)  # column v: LPS direction of voxel axis v
    axes = []
    for letter in reversed(orientation.upper()):  # array axis 0 is the last voxel axis (k)
        lps_axis, sign = lps_of[letter]
        voxel_axis = int(np.argmax(np.abs(columns[lps_axis])))
        reversed_ = bool(np.sign(columns[lps_axis, voxel_axis]) != sign)
        axes.append((2 - voxel_axis, reversed_))
    return axes


def to_frame(stacked: np.ndarray, frame) -> np.ndarray:
    """(K, d, h, w) on the input grid's axes -> the frame's axes."""
    out = np.transpose(stacked, (0, *[1 + a for a, _ in frame]))
    flips = [1 + i for i, (_, rev) in enumerate(frame) if rev]
    return np.ascontiguousarray(np.flip(out, flips) if flips else out)


def from_frame(array: np.ndarray, frame) -> np.ndarray:
    """Inverse of :func:`to_frame`."""
    flips = [1 + i for i, (_, rev) in enumerate(frame) if rev]
    array = np.flip(array, flips) if flips else array
    inverse = np.argsort([a for a, _ in frame])
    return np.transpose(array, (0, *[1 + a for a in inverse]))


def network_input(image: np.ndarray, probabilities: np.ndarray, clicks: list[tuple[np.ndarray, int]],
                  start: np.ndarray, extent: np.ndarray, spacing_dhw) -> np.ndarray:
    """(M + 2C, *extent) float32: the image z-scored over the crop, the probabilities, one click map
    per class. The crop starts at array index ``start`` and may reach past the image: the image repeats
    its edge there, the probabilities are background."""
    shape = np.asarray(probabilities.shape[1:])
    lo, hi = np.maximum(start, 0), np.minimum(start + extent, shape)
    inside = tuple(slice(a, b) for a, b in zip(lo, hi))
    pad = [(int(a - s), int(s + e - b)) for s, e, a, b in zip(start, extent, lo, hi)]
    img = np.pad(image[(slice(None),) + inside].astype(np.float32), [(0, 0)] + pad, mode="edge")
    img = (img - img.mean(axis=(1, 2, 3), keepdims=True)) / (img.std(axis=(1, 2, 3), keepdims=True) + 1e-6)
    probs = np.pad(probabilities[(slice(None),) + inside], [(0, 0)] + pad)
    probs[0][probs.sum(axis=0) == 0] = 1.0
    maps = click_maps(tuple(extent), start, spacing_dhw, clicks, probabilities.shape[0])
    return np.concatenate([img, probs.astype(np.float32), maps])


def refined_probabilities(network: torch.nn.Module, x: torch.Tensor, classes: int) -> torch.Tensor:
    """(N, M + 2C, d, h, w) network input -> (N, C, d, h, w) probabilities: the network's logits are a
    correction added to the log of the current probabilities."""
    prior = x[:, -2 * classes:-classes].clamp_min(1e-4).log()
    return torch.softmax(network(x).logits + prior, dim=1)


def class_parts(classes: list[dict], network_classes: list[str]) -> np.ndarray | None:
    """(C,) the refinement network's class index of each result class, matched by the class's part
    (a localised result's "Left anterior hippocampus" is part ``Anterior``, by its ``part`` or its name)
    or name; None when the result has the network's own classes (or names none). :class:`ClickError`
    when a class has no counterpart."""
    targets = [class_target(c, network_classes) for c in classes]
    names = [(found[1] if found else c.get("part", c["name"])).lower() for c, found in zip(classes, targets)]
    lowered = [n.lower() for n in network_classes]
    if not names or names == lowered:
        return None
    missing = [c["name"] for c, n in zip(classes, names) if n not in lowered]
    if missing:
        raise ClickError(f"the refinement network knows no class {missing[0]!r}; use --method random_walker")
    return np.array([lowered.index(n) for n in names], dtype=np.int64)


def merge_parts(probabilities: np.ndarray, parts: np.ndarray, count: int) -> np.ndarray:
    """(C, ...) probabilities of a result's classes -> (``count``, ...) float32 of the refinement network's
    classes, each result class added into its part (``parts``: :func:`class_parts`)."""
    merged = np.zeros((count, *probabilities.shape[1:]), dtype=np.float32)
    np.add.at(merged, parts, probabilities)
    return merged


def check_localised_clicks(clicks: list[Click], classes: list[dict], provenance: dict, parts: list[str]) -> None:
    """A localised result (whole head: a box per target, e.g. each hippocampus) is refined in the box a
    click falls in: a click of a target's class ("Left anterior hippocampus") must fall in that
    target's box, else :class:`ClickError` names the box it falls in (or none) and the classes to use
    there. ``provenance``: the result's (its ``localisation.targets`` boxes); ``parts``: the model card's
    class names. Clicks of background, and results of no localisation, pass."""
    boxes = {name: Box.from_dict(values)
             for name, values in ((provenance.get("localisation") or {}).get("targets") or {}).items()}
    if not boxes:
        return
    for click in clicks:
        found = class_target(classes[click.label], parts) if click.label else None
        if found is None or (found[0].name in boxes and boxes[found[0].name].contains(click.position_lps)):
            continue
        target, _ = found
        inside = [name for name, box in boxes.items() if box.contains(click.position_lps)]
        x, y, z = click.position_lps
        there = [c["name"] for c in classes[1:] if (t := class_target(c, parts)) and t[0].name in inside]
        where = (f"in the box of the {inside[0].replace('_', ' ')}; use {' or '.join(there)} there"
                 if inside else "outside every box the model segmented; only background can be clicked there")
        raise ClickError(f"click at ({x:g}, {y:g}, {z:g}) mm for {classes[click.label]['name']} falls {where} "
                         f"(the {target.side.lower()} {target.structure} is refined inside its own box)")


def refinement_packages() -> list[Path]:
    """Refinement package folders: ``refinement/<name>`` in every package search directory (kept apart
    from the segmentation models, so model lists never offer them for segmentation)."""
    return [entry for folder in search_dirs() if (folder / REFINEMENT_DIR).is_dir()
            for entry in sorted((folder / REFINEMENT_DIR).iterdir()) if (entry / CARD_FILE).is_file()]


def find_refinement_package(card: dict) -> ModelPackage | None:
    """The first refinement package for a segmentation model's card (same class and modality names),
    or ``None``."""
    classes = [c["name"] for c in card["classes"]]
    modalities = [m["name"] for m in card["modalities"]]
    for path in refinement_packages():
        try:
            package = load_package(path)
        except PackageError:
            continue
        if (package.card.get("purpose") == PURPOSE and [c["name"] for c in package.classes] == classes
                and [m["name"] for m in package.modalities] == modalities):
            return package
    return None


# -- the refiner -----------------------------------------------------------------------------------
class Refiner:
    """``Refiner(method, package=...)``; then :meth:`refine` for each new click or group of clicks.

    ``learned`` needs the refinement ``package`` (see :func:`find_refinement_package`), or a ready
    :class:`LearnedUpdate` (``learned=``, as training passes the network being trained).
    """

    def __init__(self, method: str = DEFAULT_METHOD, package: ModelPackage | None = None, device: str = "cpu",
                 learned: LearnedUpdate | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown refinement method {method!r}; choose one of {', '.join(METHODS)}")
        if method == "learned" and package is None and learned is None:
            raise ValueError("the learned refinement needs its package (no refinement model is installed for "
                             "this segmentation model); use --method random_walker or sphere")
        self.method = method
        if method == "learned" and learned is None:
            learned = LearnedUpdate.from_package(package, device)
        self.learned = learned

    def reach(self, voxel: np.ndarray, geometry: Geometry, shape) -> tuple[slice, slice, slice]:
        """The box (array slices, (D, H, W), within ``shape``) of every voxel a click at ``voxel`` reads: its
        neighbourhood (the voxels it may change), and the learned update's crop."""
        box = Neighbourhood.around(voxel, np.asarray(geometry.spacing, dtype=float)[::-1], shape).box
        if self.learned is None:
            return box
        crop = self.learned.reach(geometry, voxel)
        return tuple(slice(min(a.start, b.start), min(n, max(a.stop, b.stop))) for a, b, n in zip(box, crop, shape))

    def warm_up(self) -> None:
        """The learned update's first runs done now (see :meth:`LearnedUpdate.warm_up`); nothing for the
        others."""
        if self.learned is not None:
            self.learned.warm_up()

    def refine(self, image: np.ndarray, probabilities: np.ndarray, geometry: Geometry, clicks: list[Click],
               history: list[Click] = (), uncertainty: np.ndarray | None = None,
               labels: np.ndarray | None = None, parts: np.ndarray | None = None,
               in_place: bool = False) -> Refined:
        """Apply ``clicks`` (new) one after the other, each seeing every earlier click of ``history``.

        ``image``: (M, D, H, W) intensities on the grid of ``geometry``; ``probabilities``: (C, D, H, W)
        on the same grid. ``uncertainty`` (its normalised entropy) and ``labels`` (its argmax) are
        computed when not given; pass them (e.g. from the previous :class:`Refined`) to keep a click on
        a large volume local in time too. ``parts``: see :meth:`LearnedUpdate.__call__`. None of the
        inputs is modified, unless ``in_place``: then ``probabilities`` (float32), ``uncertainty``
        (float32) and ``labels`` (uint8), all given, are updated and returned, with no copy of the
        volume (a session that owns its arrays; on a whole head the copies cost more than the click).
        """
        t0 = time.perf_counter()
        if image.shape[1:] != probabilities.shape[1:]:
            raise ValueError(f"image {image.shape[1:]} and probabilities {probabilities.shape[1:]} are on "
                             "different grids")
        classes = probabilities.shape[0]
        spacing = np.asarray(geometry.spacing, dtype=float)[::-1]
        seen = [(click_voxel(c, geometry), c.label) for c in history]
        new = [(click_voxel(c, geometry), c.label) for c in clicks]
        for _, label in seen + new:
            if not 0 <= label < classes:
                raise ClickError(f"click class {label} is not one of the {classes} classes")
        if in_place:
            if uncertainty is None or labels is None:
                raise ValueError("in_place needs the uncertainty and the labels")
            probs, doubt = probabilities, uncertainty
        else:
            probs = probabilities.astype(np.float32, copy=True)
            dtype = label_dtype(classes)
            labels = probs.argmax(axis=0).astype(dtype) if labels is None else labels.astype(dtype, copy=True)
            doubt = normalized_entropy(probs) if uncertainty is None else uncertainty.astype(np.float32, copy=True)
        changed = np.zeros(labels.shape, dtype=bool)
        for voxel, label in new:
            seen.append((voxel, label))
            near = Neighbourhood.around(voxel, spacing, labels.shape)
            box = near.box
            current = probs[(slice(None),) + box]
            origin = [s.start for s in box]
            if self.method == "sphere":
                proposal = paint_sphere(current, near.distance, label)
            elif self.method == "random_walker":
                local = [(v, l) for v, l in seen if np.all(np.abs((v - voxel) * spacing) <= RADIUS_MM)]
                seeds = walker_seeds(current, doubt[box], near.distance, local, origin, spacing)
                proposal = random_walker(image[(slice(None),) + box], current, seeds, spacing)
            else:
                proposal = self.learned(image, probs, geometry, voxel, seen, box, parts)
            # the convex blend keeps each voxel's probabilities summing to 1; untouched voxels stay bitwise equal
            updated = np.where((near.weight > 0) & (proposal != current),
                               near.weight * proposal + (1.0 - near.weight) * current, current)
            at = tuple(int(round(v)) - s.start for v, s in zip(voxel, box))
            updated[(slice(None),) + at] = np.eye(classes, dtype=np.float32)[label]  # the user said so
            moved = np.any(updated != current, axis=0)
            probs[(slice(None),) + box] = np.where(moved, updated, current)
            changed[box] |= moved
            labels[box] = np.where(moved, probs[(slice(None),) + box].argmax(axis=0), labels[box])  # the user's edits stay
            doubt[box] = np.where(moved, normalized_entropy(probs[(slice(None),) + box]), doubt[box])
        return Refined(probs, labels, doubt, changed, time.perf_counter() - t0)

    def refine_result(self, images: list[Image], result: Result, clicks: list[Click],
                      history: list[Click] = (), in_place: bool = False) -> tuple[Result, Refined]:
        """A :class:`~AttnSegLib.inference.Result` (from ``Predictor.predict`` or read back from a result
        folder) corrected by ``clicks``: labels, probabilities and the uncertainty map updated, the
        model's own maps kept as they were. ``images``: the modalities the result was made from.
        ``in_place``: ``result``'s own arrays are updated (a caller that gives them away, as ``attnseg
        refine`` does with what it read: on a whole head the copies cost more than the click); it
        needs float32 probabilities and uncertainty and uint8 labels, else the arrays are copied."""
        stack = np.stack([img.array.astype(np.float32, copy=False) for img in images])
        uncertainty = result.maps.get("uncertainty")
        parts = None if self.learned is None else class_parts(result.classes, self.learned.class_names)
        labels, probabilities = result.labels.array, result.probabilities.array
        in_place = (in_place and uncertainty is not None and uncertainty.array.dtype == np.float32
                    and probabilities.dtype == np.float32 and labels.dtype == np.uint8)
        refined = self.refine(stack, probabilities, result.labels.geometry, clicks, history,
                              None if uncertainty is None else uncertainty.array, labels, parts, in_place)
        geometry = result.labels.geometry
        corrected = replace(result, labels=Image(refined.labels, geometry),
                            probabilities=Image(refined.probabilities, geometry),
                            maps={**result.maps, "uncertainty": Image(refined.uncertainty, geometry)},
                            timings={"refine": refined.seconds}, notices=list(result.notices))
        return corrected, refined
