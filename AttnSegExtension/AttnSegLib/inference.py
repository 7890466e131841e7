"""The Predictor: one model package in, a label map and readable maps on the input grid out.

Sliding-window inference with Gaussian blending (MONAI ``sliding_window_inference``) over the case in
the model frame; each window yields softmax probabilities (of the logits divided by the card's
``inference.temperature``, fitted at export; 1 when absent) and, when maps are asked for, the network's
own maps, all blended with the same weights (without maps the network runs its ``segment`` step
alone; a network whose maps come from its probabilities and the image alone runs ``segment`` per
window and its map head once per voxel on the blended result, :func:`maps_on_blended`). Optional
flip test-time augmentation (per window, all 8 axis flips; with maps, their disagreement is the
``tta_variance`` map), device ``auto|cpu|cuda|mps``, float16 autocast on CUDA, a progress callback (fraction, ETA, stage), a cancel
flag checked between window batches, and an out-of-memory fallback (halve the window batch, then the
CPU) that lasts for one call only: the Predictor keeps no state between calls. Deterministic on the
same device: no random ops, cuDNN autotuning off (:func:`deterministic`, for the call's duration).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, Protocol

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from torch.overrides import TorchFunctionMode

from . import __version__
from .card import UNCERTAINTY, ModelCard
from .errors import InputError, OutOfMemory
from .image import Geometry, Image, label_dtype
from .localise import (REFERENCE_SCALE, SCALE_RANGE, Box, LocalisationError, coverage_notice, crop_grids, crop_images,
                       cut, footprint, localise_targets, much_larger, plausible_volume, resample, sub_geometry,
                       target_classes)
from .maps import normalized_entropy, resize_map, split_channels, volume_name
from .package import ModelPackage
from .preprocess import align_modalities, check_spacing_units, coarse_voxel_notices, to_model_frame

ProgressCallback = Callable[[float, "float | None", str], None]
# A crop's segmentation this close to a face (voxels) is cut by it: the default model's segmentations of the
# 201 MSD crops keep 4 voxels or more from every face (their expert labels 3); a crop cut through the sample's
# hippocampus put foreground on the face itself and lost 24-100 % of a part's volume.
EDGE_VOXELS = 2


class Cancelled(Exception):
    """The user cancelled; nothing was produced."""


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


@dataclass
class Result:
    """Everything a front end shows, on the input grid.

    ``labels``: (D, H, W) uint8 (uint16 beyond 256 classes). ``probabilities``: (C, D, H, W) float32.
    ``maps``: name -> (D, H, W) float32 ("uncertainty" always; the model's own maps unless disabled).
    ``review_map_name``: the map doubtful regions are ranked by (the card's ``inference.review_map``).
    ``classes``: what each label value means (the card's classes, or for a localised whole head each
    target's copy of them, e.g. "Left anterior hippocampus" with its ``side`` and ``part``).
    """

    labels: Image
    probabilities: Image
    maps: dict[str, Image]
    review_map_name: str
    timings: dict[str, float]
    provenance: dict
    notices: list[str] = field(default_factory=list)
    classes: list[dict] = field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.classes]

    def class_volumes_ml(self, class_names: list[str] | None = None) -> dict[str, float]:
        """Foreground class name -> volume in ml (see :func:`AttnSegLib.outputs.class_volumes_ml`)."""
        from .outputs import class_volumes_ml

        return class_volumes_ml(self.labels, self.classes)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; an explicit unavailable device is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("device 'mps' was asked for but Apple MPS is not available; use --device cpu or auto")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}; choose auto, cpu, cuda or mps")
    return torch.device(device)


def count_windows(image_size, roi_size, overlap: float) -> int:
    """Number of windows MONAI's sliding window visits (its scan-interval rule)."""
    total = 1
    for size, roi in zip(image_size, roi_size):
        size = max(size, roi)
        interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
        total *= math.ceil((size - roi) / interval) + 1
    return total


def flip_combinations(axes) -> list[tuple[int, ...]]:
    """Every subset of the spatial ``axes`` (0 = D, 1 = H, 2 = W) as dims of an (N, C, D, H, W) tensor.

    Only axes a model was trained to be symmetric along belong here: mirroring a hippocampus along
    its anterior-posterior axis swaps the two classes, so its card lists the left-right axis alone.
    """
    dims = [int(a) + 2 for a in axes]
    return [combo for r in range(len(dims) + 1) for combo in itertools.combinations(dims, r)]


def versions() -> dict[str, str]:
    """The versions of AttnSeg and the libraries a result depends on (a new dict each call)."""
    return dict(_installed_versions())


@functools.cache
def _installed_versions() -> dict[str, str]:
    """Read once per process: ``importlib.metadata`` parses each package's METADATA file, which every
    result's provenance paid again (2 to 3 ms of CPU time a case)."""
    out = {"attnseg": __version__, "torch": torch.__version__, "SimpleITK": sitk.Version_VersionString()}
    for pkg in ("monai", "numpy", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


class _WindowRunner:
    """MONAI predictor callable: (B, M, d, h, w) window batch -> dict of (B, K, d, h, w) tensors.

    ``probabilities`` (B, C, d, h, w): softmax(logits / ``temperature``); with ``with_maps`` also
    ``map:<name>`` (B, K, d, h, w) for each of the network's maps, else the network runs its
    ``segment`` step alone (no map-only head). Counts windows for progress, checks the cancel flag,
    averages over the ``flips`` (TTA) per window; with ``tta_variance`` and more than one flip also
    ``map:tta_variance`` (B, 1, d, h, w): the variance of the probabilities over the flips summed over
    the C classes, divided by its largest possible value 1 - 1/C, so in [0, 1].
    """

    def __init__(self, network, flips, with_maps, autocast_dtype, total, progress, cancel, temperature=1.0,
                 tta_variance=False):
        self.network, self.flips = network, flips
        self.tta_variance = tta_variance and len(flips) > 1
        self.with_maps, self.autocast_dtype = with_maps, autocast_dtype
        self.temperature = temperature
        self.total, self.done, self.started = total, 0, time.perf_counter()
        self.progress, self.cancel = progress, cancel

    def _forward(self, x):
        device_type = x.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = lone_window(self.network, x) if self.with_maps else None
            logits = out.logits if out is not None else lone_window(self.network.segment, x)
        result = {"probabilities": torch.softmax(logits.float() / self.temperature, dim=1)}
        if out is not None:
            for name, value in out.maps.items():
                result[f"map:{name}"] = resize_map(value.float(), x.shape[2:])
        return result

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled()
        summed: dict[str, torch.Tensor] = {}
        squares = 0.0
        for dims in self.flips:
            out = self._forward(torch.flip(batch, dims) if dims else batch)
            for key, value in out.items():
                value = torch.flip(value, dims) if dims else value
                summed[key] = summed[key] + value if key in summed else value
                if key == "probabilities" and self.tta_variance:
                    squares = squares + value ** 2
        mean = {k: v / len(self.flips) for k, v in summed.items()}
        if self.tta_variance:
            probabilities = mean["probabilities"]
            variance = (squares / len(self.flips) - probabilities ** 2).sum(1, keepdim=True)
            mean["map:tta_variance"] = (variance / (1 - 1 / probabilities.shape[1])).clamp(0.0, 1.0)
        self.done += batch.shape[0]
        if self.progress is not None:
            elapsed = time.perf_counter() - self.started
            fraction = min(self.done / self.total, 1.0)
            eta = elapsed * (1 - fraction) / fraction if fraction > 0 else None
            self.progress(fraction, eta, "predict")
        return mean


def lone_window(function, *windows: torch.Tensor):
    """``function(*windows)``, each window batch (B, ...); on the CPU a lone window (B = 1) gets, op for
    op, what the first of a batch of two copies of it gets, at the cost of one
    (:class:`_LoneWindowConvolutions`).

    For one small 3D window PyTorch's CPU convolution takes its im2col path, and oneDNN from two
    windows on: one 40x56x40 window of the default segmenter takes 0.33 s alone, 0.13 s as a batch of
    two copies and 0.07 s with each convolution sent to oneDNN directly (one thread; a hippocampus
    crop is one window). The answer is the batch of two's up to float rounding (oneDNN may order a
    sum differently for one window than for two): on real hippocampus crops the labels are the same,
    the probabilities within 4e-7 and the maps within 3e-6.
    """
    if windows[0].shape[0] != 1 or windows[0].device.type != "cpu":
        return function(*windows)
    with _LoneWindowConvolutions():
        return function(*windows)


class _LoneWindowConvolutions(TorchFunctionMode):
    """While active, each 3D convolution of a batch of one on the CPU returns what it returns for the
    first of two copies of its input (up to float rounding). A convolution PyTorch runs through oneDNN
    for two windows (any kernel but 1x1 in its last two dimensions unstrided, :func:`_pointwise`) calls
    oneDNN directly for the one (half the work of two). A 1x1x1 convolution and a transposed
    convolution whose kernel is its stride (the U-Nets' up-sampling) are one matrix product each
    (:func:`_matmul_conv3d`, :func:`_matmul_conv_transpose3d`): every output voxel is a sum over the
    input channels alone, which the product computes as the convolution does. The others (kernels 1x1
    in their last two dimensions only, other transposed convolutions) run on two copies, the first
    answer kept. Only those ops' inputs are ever doubled, so a run whose out-of-memory fallback brought
    the window batch down to one needs no more memory for it than a window alone, near enough."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv3d:
            return _lone_conv3d(*args, **kwargs)
        if func is torch.conv_transpose3d:
            return _lone_conv_transpose3d(*args, **kwargs)
        return func(*args, **kwargs)


def _lone_conv3d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    stride, dilation = _triple(stride), _triple(dilation)
    if not _lone_cpu_float(x) or isinstance(padding, str):
        return _first_of_two(torch.conv3d, x, weight, bias, stride, padding, dilation, groups)
    if _pointwise(weight, stride, dilation):
        if weight.shape[-3] == 1 and groups == 1 and not any(_triple(padding)):
            return _matmul_conv3d(x, weight, bias)
        return _first_of_two(torch.conv3d, x, weight, bias, stride, padding, dilation, groups)
    if not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled:
        return _first_of_two(torch.conv3d, x, weight, bias, stride, padding, dilation, groups)
    return torch.ops.aten.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias, _triple(padding), stride,
                                             dilation, groups)


def _lone_conv_transpose3d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    if (_lone_cpu_float(x) and groups == 1 and _triple(stride) == list(weight.shape[2:])
            and not any(_triple(padding)) and not any(_triple(output_padding)) and max(_triple(dilation)) == 1):
        return _matmul_conv_transpose3d(x, weight, bias)
    return _first_of_two(torch.conv_transpose3d, x, weight, bias, stride, padding, output_padding, groups, dilation)


def _lone_cpu_float(x: torch.Tensor) -> bool:
    return x.shape[0] == 1 and x.device.type == "cpu" and x.dtype == torch.float32


def _matmul_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1x1 convolution of a batch of one as one matrix product: x (1, C_in, D, H, W), weight
    (C_out, C_in, 1, 1, 1) -> (1, C_out, D, H, W)."""
    matrix, voxels = weight.reshape(weight.shape[0], -1), x.reshape(x.shape[1], -1)
    out = torch.mm(matrix, voxels) if bias is None else torch.addmm(bias[:, None], matrix, voxels)
    return out.view(1, -1, *x.shape[2:])


def _matmul_conv_transpose3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A transposed convolution whose kernel (kd, kh, kw) is its stride, unpadded, of a batch of one,
    as one matrix product: x (1, C_in, d, h, w), weight (C_in, C_out, kd, kh, kw) -> (1, C_out, d kd,
    h kh, w kw). Input voxel (i, j, k) alone makes the output block at (i kd, j kh, k kw): the product
    gives every block's C_out kd kh kw values, which are then laid out on the output grid."""
    c_in, c_out, kd, kh, kw = weight.shape
    d, h, w = x.shape[2:]
    blocks = torch.mm(weight.reshape(c_in, -1).t(), x.reshape(c_in, -1))  # (C_out kd kh kw, d h w)
    out = blocks.view(c_out, kd, kh, kw, d, h, w).permute(0, 4, 1, 5, 2, 6, 3).reshape(1, c_out, d * kd, h * kh, w * kw)
    return out if bias is None else out.add_(bias.view(1, -1, 1, 1, 1))


def _pointwise(weight: torch.Tensor, stride, dilation) -> bool:
    """A kernel 1x1 in its last two dimensions, unstrided and undilated: PyTorch's own CPU kernel, not
    oneDNN's, computes it on one thread."""
    return weight.shape[-1] == weight.shape[-2] == 1 and max(stride) == 1 and max(dilation) == 1


def _first_of_two(function, x, *args, **kwargs):
    """``function`` on a batch of two copies of ``x`` (a batch of one), the first answer; else as is."""
    if x.shape[0] != 1:
        return function(x, *args, **kwargs)
    return function(torch.cat([x, x]), *args, **kwargs)[:1]


def _triple(value) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * 3


def untempered(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(z / T) (N, C, ...) -> softmax(z): p^T renormalised over C (exact for one window's p)."""
    if temperature == 1.0:
        return probabilities
    powered = probabilities ** temperature
    return powered / powered.sum(1, keepdim=True).clamp_min(torch.finfo(powered.dtype).tiny)


def pad_to_windows(probabilities: torch.Tensor, image: torch.Tensor, patch_size):
    """Probabilities (N, C, D, H, W) and image (N, M, D, H, W) padded, centred, to whole windows of
    ``patch_size`` as the sliding window pads (background probability 1, the image's minimum), and
    the index of the original volume in them: (probabilities, image, index)."""
    size = probabilities.shape[2:]
    padded = [math.ceil(s / roi) * roi for s, roi in zip(size, patch_size)]
    before = [(p - s) // 2 for s, p in zip(size, padded)]
    pads = [n for s, p, b in reversed(list(zip(size, padded, before))) for n in (b, p - s - b)]  # W first
    probabilities = torch.cat([torch.nn.functional.pad(probabilities[:, :1], pads, value=1.0),
                               torch.nn.functional.pad(probabilities[:, 1:], pads, value=0.0)], dim=1)
    image = torch.nn.functional.pad(image, pads, value=float(image.min()))
    return probabilities, image, (slice(None), slice(None)) + tuple(slice(b, b + s) for b, s in zip(before, size))


def maps_on_blended(network, probabilities: torch.Tensor, image: torch.Tensor, patch_size, temperature: float,
                    device: torch.device, batch_size: int = 1, autocast_dtype=None,
                    cancel: CancelFlag | None = None) -> dict[str, torch.Tensor]:
    """The maps of a network with ``maps_from_probabilities_only``, once per voxel on the blended result.

    ``probabilities`` (1, C, D, H, W): the blended softmax(logits / ``temperature``); ``image``
    (1, M, D, H, W) -> name -> (1, K, D, H, W) on the CPU. The probabilities go back to temperature 1
    (p^T renormalised; exact where one window covers a voxel), which the map head was trained on. The
    volume is padded to whole windows of ``patch_size`` as the sliding window pads (centred; the
    image's minimum, background probability 1) and cut into windows that do not overlap, so the head
    sees inputs of the size it was trained on and each voxel once; ``batch_size`` windows at a time.
    """
    probabilities, image, inside = pad_to_windows(untempered(probabilities, temperature), image, patch_size)
    padded = probabilities.shape[2:]
    windows = [(slice(None), slice(None)) + tuple(slice(c, c + roi) for c, roi in zip(corner, patch_size))
               for corner in itertools.product(*(range(0, p, roi) for p, roi in zip(padded, patch_size)))]
    maps: dict[str, torch.Tensor] = {}
    for start in range(0, len(windows), batch_size):
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        batch = windows[start:start + batch_size]
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = lone_window(network.maps_from_probabilities, torch.cat([probabilities[w] for w in batch]).to(device),
                              torch.cat([image[w] for w in batch]).to(device))
        for name, value in out.items():
            if name not in maps:
                maps[name] = torch.empty((1, value.shape[1], *padded), dtype=torch.float32)
            value = resize_map(value.float(), patch_size).cpu()
            for k, window in enumerate(batch):
                maps[name][window] = value[k:k + 1]
    return {name: value[inside] for name, value in maps.items()}


def _one_line(err: BaseException, limit: int = 200) -> str:
    return " ".join(str(err).split())[:limit]


def _is_out_of_memory(err: RuntimeError) -> bool:
    """CUDA raises ``torch.OutOfMemoryError``; the CPU and MPS allocators raise a plain RuntimeError."""
    return isinstance(err, torch.OutOfMemoryError) or any(
        text in str(err) for text in ("out of memory", "can't allocate memory", "not enough memory", "Seems to be OOM"))


@contextlib.contextmanager
def deterministic(device: torch.device):
    """Within the block, cuDNN picks the same algorithms every time (no autotuning, deterministic
    kernels) on ``device``; the previous global settings come back afterwards."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    previous = cudnn.benchmark, cudnn.deterministic
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = previous


@dataclass
class _Run:
    """What one :meth:`Predictor.predict` call adjusted for itself: the window batch and device an
    out-of-memory fallback settled on, and the notices saying so. Made fresh for every call, so nothing
    carries over to the next."""

    device: torch.device
    batch_size: int
    half: bool
    notices: list[str] = field(default_factory=list)

    @property
    def autocast_dtype(self):
        return torch.float16 if (self.half and self.device.type == "cuda") else None


def _argmax_labels(probabilities: np.ndarray, slab: int = 8) -> np.ndarray:
    """(C, D, H, W) -> (D, H, W) class indices of :func:`label_dtype`, ``slab`` slices at a time:
    ``np.argmax`` of the whole volume would make an int64 copy twice the size of a float32 volume."""
    labels = np.empty(probabilities.shape[1:], dtype=label_dtype(probabilities.shape[0]))
    for start in range(0, labels.shape[0], slab):
        labels[start:start + slab] = probabilities[:, start:start + slab].argmax(axis=0)
    return labels


def edge_notices(labels: np.ndarray) -> list[str]:
    """A notice when the (D, H, W) ``labels`` of a crop reach within :data:`EDGE_VOXELS` of its faces: the
    structure goes on beyond the crop."""
    inner = labels[tuple(slice(EDGE_VOXELS, max(EDGE_VOXELS, n - EDGE_VOXELS)) for n in labels.shape)]
    near = int(np.count_nonzero(labels)) - int(np.count_nonzero(inner))
    if not near:
        return []
    return [f"the segmentation reaches the edge of the image ({near} voxels within {EDGE_VOXELS} of its faces): the "
            "structure goes on beyond this crop and its volume is too small — give a crop with a margin around the "
            "whole structure"]


def fill_background(probabilities: np.ndarray) -> None:
    """(C, ...) float32 whose channels 1.. hold the foreground classes (put back from size-normalised
    crops, or read from a scene's maps): channel 0 set, in place and without a volume-sized temporary,
    to 1 minus their sum clipped to [0, 1]."""
    background = probabilities[0]
    np.sum(probabilities[1:], axis=0, out=background)
    np.clip(np.subtract(1.0, background, out=background), 0.0, 1.0, out=background)


# A box without a size factor on a whole head: the model sees this head's anatomy at its own size, not at the
# reference size a localised crop has (localise.py, step 3), and its volumes can differ from a localised run's.
OWN_SIZE_NOTICE = ("the box was used at the scan's own size (no registration gave this head's size); for the size "
                   "the localisation uses, pass its size factor (--size-factor, from a localised run's report.json "
                   "provenance.localisation.size_factor)")


class Predictor:
    """``Predictor(package)`` or ``Predictor(network, card=card)``; then :meth:`predict`.

    ``overlap`` and ``batch_size`` default to the card's ``inference`` section; with ``tta`` the windows
    are averaged over mirrorings along the card's ``inference.tta_flip_axes``. ``localise=False``
    segments every input whole, even one much larger than the card's training field of view (speed
    baselines only: such an answer is meaningless). ``fallback=False``: an out-of-memory error is raised
    (:class:`~AttnSegLib.errors.OutOfMemory`) instead of retrying with fewer windows or on the CPU
    (validation during training, whose network must stay where it is).

    The settings here never change: an out-of-memory fallback lasts for the call that needed it
    (its window batch, device and notices live in that call's :class:`_Run`).
    """

    def __init__(self, model: ModelPackage | torch.nn.Module, card: ModelCard | dict | None = None,
                 device: str = "auto", tta: bool = False, with_maps: bool = True,
                 overlap: float | None = None, batch_size: int | None = None, half: bool | None = None,
                 localise: bool = True, fallback: bool = True):
        if isinstance(model, ModelPackage):
            self.package, self.card, network = model, model.card, model.build_network()
        else:
            if card is None:
                raise TypeError("Predictor(network) needs the model card (card=...)")
            self.package, self.card, network = None, ModelCard.parse(card, saved=False), model
        settings = self.card.inference
        self.device = resolve_device(device)
        self.network = network.eval().to(self.device)
        self.tta, self.with_maps, self.localise, self.fallback = tta, with_maps, localise, fallback
        self.flips = flip_combinations(settings.tta_flip_axes) if tta else [()]
        self.overlap = float(overlap if overlap is not None else settings.overlap)
        self.batch_size = int(batch_size if batch_size is not None else settings.batch_size)
        if not 0 <= self.overlap < 1:
            raise InputError(f"window overlap must be at least 0 and below 1, got {self.overlap}; 0.5 is usual")
        if self.batch_size < 1:
            raise InputError(f"the window batch size must be at least 1, got {self.batch_size}")
        self.half = (self.device.type == "cuda") if half is None else half
        self.patch_size = tuple(self.card.patch_size_dhw)
        self.class_names = self.card.class_names

    def _new_run(self) -> _Run:
        return _Run(self.device, self.batch_size, self.half)

    # -- model frame -------------------------------------------------------------------------
    def _sliding_window(self, x: torch.Tensor, progress, cancel, run: _Run) -> dict[str, torch.Tensor]:
        blended_maps = self.with_maps and getattr(self.network, "maps_from_probabilities_only", False)
        temperature = self.card.inference.temperature
        if progress is not None:  # the first window can take seconds (a volume of one window: all of it)
            progress(0.0, None, "first window")
        try:
            while True:
                runner = _WindowRunner(
                    self.network, self.flips, self.with_maps and not blended_maps, run.autocast_dtype,
                    count_windows(x.shape[2:], self.patch_size, self.overlap), progress, cancel, temperature,
                    tta_variance=self.with_maps)
                try:
                    with torch.inference_mode(), deterministic(run.device):
                        out = sliding_window_inference(
                            x.to(run.device), self.patch_size, run.batch_size, runner, self.overlap,
                            mode="gaussian", padding_mode="constant", cval=float(x.min()),
                            device=torch.device("cpu"))
                        if blended_maps:
                            maps = maps_on_blended(self.network, out["probabilities"], x, self.patch_size,
                                                   temperature, run.device, run.batch_size, run.autocast_dtype,
                                                   cancel)
                            out.update({f"map:{name}": value for name, value in maps.items()})
                        return out
                except RuntimeError as err:  # torch.OutOfMemoryError is one
                    if not _is_out_of_memory(err):
                        raise
                    self._fall_back(run, err)
        finally:
            if run.device != self.device:  # the CPU fallback of this run: the network goes back
                self.network.to(self.device)

    def _fall_back(self, run: _Run, err: RuntimeError) -> None:
        """Out of memory: halve this run's window batch; at a batch of one, move it to the CPU."""
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
        if not self.fallback:
            raise OutOfMemory(f"out of memory on {run.device} with {run.batch_size} window(s) per batch "
                              f"({_one_line(err)}); lower the window batch or the patch size") from None
        if run.batch_size > 1:
            run.batch_size //= 2
            run.notices.append(f"out of memory on {run.device}; retrying with {run.batch_size} window(s) per batch")
        elif run.device.type != "cpu":
            run.notices.append(f"out of memory on {run.device} with one window; falling back to the CPU")
            run.device, run.half = torch.device("cpu"), False
            self.network.to(run.device)
        else:
            raise OutOfMemory("out of memory on the CPU with one window at a time; close other programs or "
                              "use a smaller volume")

    def predict_array(self, x: np.ndarray, progress: ProgressCallback | None = None,
                      cancel: CancelFlag | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(M, D, H, W) normalised, in the model frame -> ((C, D, H, W) probabilities, name -> (K, D, H, W))."""
        return self._predict_array(x, progress, cancel, self._new_run())

    def _predict_array(self, x: np.ndarray, progress, cancel, run: _Run):
        tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
        out = self._sliding_window(tensor, progress, cancel, run)
        probabilities = out.pop("probabilities")[0].numpy()
        maps = {key.removeprefix("map:"): value[0].numpy() for key, value in out.items()}
        return probabilities, maps

    # -- images in, results on the input grid ------------------------------------------------
    def predict(self, images: list[Image], progress: ProgressCallback | None = None,
                cancel: CancelFlag | None = None, roi: Box | None = None,
                size_factor: float | None = None) -> Result:
        """One case (one image per modality, the card's order) -> :class:`Result` on the first image's grid.

        ``roi``: segment only inside this box (LPS mm; :meth:`Box.from_centre_size`). Without one, an
        input much larger than the card's ``inference.training_field_of_view_mm`` is localised as the
        card's ``inference.localisation`` says (:mod:`AttnSegLib.localise`), or refused with
        :class:`LocalisationError` when the card gives no way. ``size_factor`` (with ``roi`` only): the
        head's :attr:`~AttnSegLib.localise.Registration.size_factor`; the box is then sampled
        size-normalised, as a localised crop is. Without it the box is cut at the scan's own size.
        """
        if size_factor is not None and (roi is None or not np.isfinite(size_factor) or size_factor <= 0):
            raise InputError(f"a size factor ({size_factor}) needs an ROI and must be a positive number; it is the "
                             "registration's size_factor (report.json's localisation)")
        low, high = (s / REFERENCE_SCALE for s in SCALE_RANGE)  # what a registration that passed its check gives
        if size_factor is not None and not low <= size_factor <= high:
            raise InputError(f"a size factor of {size_factor:g} is no head's: a registration gives {low:.2f}-{high:.2f} "
                             "(report.json's provenance.localisation.size_factor)")
        settings, run = self.card.inference, self._new_run()
        field_of_view = settings.training_field_of_view_mm
        if len(images) != len(self.card.modalities):
            return self._predict_grid(images, progress, cancel, run)  # which refuses with the usual message
        coarse = []
        if self.card.spacing_xyz_mm:
            check_spacing_units(images[0].geometry, self.card.spacing_xyz_mm)
            coarse = coarse_voxel_notices(images[0].geometry, self.card.spacing_xyz_mm)
        if roi is not None:
            result = self._predict_roi(images, roi, size_factor, progress, cancel, run)
        elif not (self.localise and field_of_view and much_larger(images[0].geometry, field_of_view)):
            result = self._predict_grid(images, progress, cancel, run)
            if settings.localisation:  # a model of crops around a structure: a crop holds it whole
                result.notices += edge_notices(result.labels.array)
        elif not settings.localisation:
            extent = " x ".join(f"{e:.0f}" for e in np.asarray(images[0].geometry.size) * images[0].geometry.spacing)
            raise LocalisationError(
                f"the image ({extent} mm) is much larger than the {' x '.join(f'{v:g}' for v in field_of_view)} mm "
                f"field of view model {self.card.name!r} was trained on, and its card says no way to localise "
                "the structure; give the region with --roi CX,CY,CZ,SX,SY,SZ (LPS mm) or crop the image")
        else:
            result = self._predict_localised(images, progress, cancel, run)
        result.notices[:0] = coarse
        return result

    def _predict_localised(self, images: list[Image], progress, cancel, run: _Run) -> Result:
        """Register the template, segment one crop per target, bring every crop back (see localise.py)."""
        timings: dict[str, float] = {"localise": 0.0, "preprocess": 0.0, "predict": 0.0, "postprocess": 0.0}
        t0 = time.perf_counter()
        if progress is not None:
            progress(0.0, None, "localise")
        images, notices = align_modalities(images, self.card.modality_names)
        registration, placed = localise_targets(images[0], self.card)
        targets = [target for target, _ in placed]
        classes = target_classes(self.card.class_dicts, targets)
        geometry = images[0].geometry
        timings["localise"] = time.perf_counter() - t0
        parts = len(self.card.classes) - 1
        shape = tuple(reversed(geometry.size))
        foreground = np.zeros((len(classes) - 1,) + shape, dtype=np.float32)
        maps: dict[str, np.ndarray] = {}
        boxes = {}
        for n, (target, box) in enumerate(placed):
            t0 = time.perf_counter()
            index = footprint(box.corners(), geometry)
            if index is None:
                raise LocalisationError(f"the {target.side.lower()} {target.structure} lies outside this image; "
                                        "give a scan that covers it, or the region with --roi")
            crop, grid = self._sample_crop(images, box, registration.size_factor)
            cut_short = coverage_notice(registration, target, self.card.orientation, geometry)
            timings["localise"] += time.perf_counter() - t0
            step = None if progress is None else (
                lambda f, eta, stage, n=n: progress((n + f) / len(targets), None, f"{target.name}: {stage}"))
            result = self._predict_grid(crop, step, cancel, run)
            for stage in ("preprocess", "predict", "postprocess"):
                timings[stage] += result.timings[stage]
            volume = plausible_volume(result.labels.array, grid.voxel_volume_ml, target)
            t0 = time.perf_counter()
            back, crop_maps = self._crop_back(result, grid, sub_geometry(geometry, index))
            foreground[(slice(n * parts, (n + 1) * parts),) + index] += back
            for name, values in crop_maps.items():
                on_grid = maps.setdefault(name, np.zeros(shape, dtype=np.float32))
                np.maximum(on_grid[index], values, out=on_grid[index])
            own = ([cut_short] if cut_short else []) + result.notices
            notices += [f"{target.name}: {text}" for text in own if text not in run.notices]
            boxes[target.name] = {**box.as_dict(), "crop_volume_ml": round(volume, 3)}
            timings["postprocess"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        probabilities = np.empty((len(classes),) + shape, dtype=np.float32)
        probabilities[1:] = foreground
        del foreground
        fill_background(probabilities)
        labels = _argmax_labels(probabilities)
        timings["postprocess"] += time.perf_counter() - t0
        provenance = {**self.provenance(run), "localisation": {**registration.as_dict(), "targets": boxes}}
        image_maps = {name: Image(values, geometry) for name, values in maps.items()}
        return Result(Image(labels, geometry), Image(probabilities, geometry), image_maps,
                      self.review_map_name(image_maps), timings, provenance,
                      list(dict.fromkeys(notices + run.notices)), classes)

    def _sample_crop(self, images: list[Image], box: Box, size_factor: float) -> tuple[list[Image], Geometry]:
        """The size-normalised crop of ``images`` inside ``box`` (localise.py, step 3): (one image per
        modality, its (D, H, W) voxels labelled with the model's spacing, as the model is shown them; the
        grid they were sampled on in the input, the model's spacing times ``size_factor`` mm)."""
        spacing = self.card.spacing_xyz_mm or images[0].geometry.spacing
        grid, shown = crop_grids(box, spacing, size_factor)
        return [Image(image.array, shown) for image in crop_images(images, grid)], grid

    @staticmethod
    def _crop_back(result: Result, grid: Geometry, region: Geometry) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """A size-normalised crop's ``result`` (arrays on its sampled ``grid``) resampled linearly onto
        ``region``, a part of the input grid (localise.py, step 4): ((K, D, H, W) probabilities of the card's K
        foreground classes; map name -> (D, H, W)), 0 outside the crop."""
        foreground = np.stack([resample(Image(p, grid), region, 0.0) for p in result.probabilities.array[1:]])
        maps = {name: resample(Image(image.array, grid), region, 0.0) for name, image in result.maps.items()}
        return foreground, maps

    def _predict_roi(self, images: list[Image], roi: Box, size_factor: float | None, progress, cancel,
                     run: _Run) -> Result:
        """Segment the part of the input inside ``roi``; background elsewhere. Without ``size_factor`` the box
        is cut on the input's own grid (no interpolation); with it, sampled size-normalised and put back as a
        localised crop is (:meth:`_sample_crop`, :meth:`_crop_back`)."""
        images, notices = align_modalities(images, self.card.modality_names)
        geometry = images[0].geometry
        index = footprint(roi.corners(), geometry)
        if index is None:
            corners = geometry.corners_lps()
            raise LocalisationError(
                f"the ROI (centre {', '.join(f'{c:g}' for c in roi.centre)} mm LPS) lies outside the image, which "
                f"spans {', '.join(f'{a:.0f}..{b:.0f}' for a, b in zip(corners.min(0), corners.max(0)))} mm (LPS x, y, z); "
                "give the centre in the image's LPS coordinates")
        shape = tuple(reversed(geometry.size))
        probabilities = np.zeros((len(self.class_names),) + shape, dtype=np.float32)
        probabilities[0] = 1.0
        maps = {}
        provenance_roi = roi.as_dict()
        if size_factor is None:
            result = self._predict_grid(cut(images, index), progress, cancel, run)
            settings = self.card.inference
            if settings.localisation and settings.training_field_of_view_mm and \
                    much_larger(geometry, settings.training_field_of_view_mm):
                notices.append(OWN_SIZE_NOTICE)
            t0 = time.perf_counter()
            labels = np.zeros(shape, dtype=result.labels.array.dtype)
            labels[index] = result.labels.array
            probabilities[(slice(None),) + index] = result.probabilities.array
            crop_maps = {name: image.array for name, image in result.maps.items()}
        else:
            t0 = time.perf_counter()
            crop, grid = self._sample_crop(images, roi, size_factor)
            sampling = time.perf_counter() - t0
            result = self._predict_grid(crop, progress, cancel, run)
            result.timings["preprocess"] += sampling
            t0 = time.perf_counter()
            region = probabilities[(slice(None),) + index]
            region[1:], crop_maps = self._crop_back(result, grid, sub_geometry(geometry, index))
            fill_background(region)
            labels = np.zeros(shape, dtype=label_dtype(len(self.class_names)))
            labels[index] = _argmax_labels(region)
            provenance_roi["size_factor"] = round(float(size_factor), 4)
        for name, values in crop_maps.items():
            maps[name] = np.zeros(shape, dtype=np.float32)
            maps[name][index] = values
        result.timings["postprocess"] += time.perf_counter() - t0
        provenance = {**result.provenance, "roi": provenance_roi}
        return Result(Image(labels, geometry), Image(probabilities, geometry),
                      {name: Image(values, geometry) for name, values in maps.items()}, result.review_map_name,
                      result.timings, provenance, notices + result.notices, result.classes)

    def _predict_grid(self, images: list[Image], progress: ProgressCallback | None, cancel: CancelFlag | None,
                      run: _Run) -> Result:
        """The whole input, as given, through the model frame and back."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        if progress is not None:
            progress(0.0, None, "preprocess")
        card = self.card
        prepared = to_model_frame(images, card.modality_dicts, card.spacing_xyz_mm, card.orientation,
                                  card.crop_to_nonzero, card.input_statistics)
        timings["preprocess"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        model_input, prepared.array = prepared.array, None  # freed once predicted: postprocessing never needs it
        probabilities, raw_maps = self._predict_array(model_input, progress, cancel, run)
        del model_input
        timings["predict"] = time.perf_counter() - t0
        if cancel is not None and cancel.is_set():
            raise Cancelled()

        t0 = time.perf_counter()
        if progress is not None:
            progress(1.0, 0.0, "postprocess")
        background = np.zeros(len(self.class_names), dtype=np.float32)
        background[0] = 1.0
        probs_grid = prepared.to_input_grid(probabilities, fill=background)
        del probabilities  # the model-frame copy, when the input grid differs
        labels = _argmax_labels(probs_grid)
        geometry = prepared.input_geometry
        maps = {UNCERTAINTY: Image(normalized_entropy(probs_grid), geometry)}
        class_channel = set(getattr(self.network, "class_channel_maps", ()))
        tokens = [volume_name(n) for n in self.class_names]
        for name in list(raw_maps):
            on_grid = prepared.to_input_grid(raw_maps.pop(name), fill=0.0)
            for key, arr in split_channels(name, on_grid, tokens if name in class_channel else None).items():
                maps[key] = Image(arr.astype(np.float32, copy=False), geometry)
        timings["postprocess"] = time.perf_counter() - t0
        return Result(
            labels=Image(labels, geometry),
            probabilities=Image(probs_grid.astype(np.float32, copy=False), geometry),
            maps=maps,
            review_map_name=self.review_map_name(maps),
            timings=timings,
            provenance=self.provenance(run),
            notices=prepared.notices + run.notices,
            classes=card.class_dicts,
        )

    def review_map_name(self, maps: dict) -> str:
        """The map that ranks doubtful regions: the card's ``inference.review_map`` (chosen at export as
        the map that found the validation errors best), else ``difficulty`` when the model has one, else
        ``uncertainty``."""
        chosen = self.card.inference.review_map
        if chosen in maps:
            return chosen
        return "difficulty" if "difficulty" in maps else UNCERTAINTY

    def provenance(self, run: _Run | None = None) -> dict:
        """How a result was made: the model, the settings, and what ``run`` (default: none yet) used."""
        run = run or self._new_run()
        return {
            "model": self.card.name,
            "architecture": self.card.architecture,
            "weights_sha256": self.card.weights_sha256 or None,
            "package_path": str(self.package.path) if self.package else None,
            "device": str(run.device),
            "half_precision": run.autocast_dtype is not None,
            "tta": self.tta, "tta_flips": len(self.flips), "overlap": self.overlap, "window_batch": run.batch_size,
            "patch_size_dhw": list(self.patch_size),
            "versions": versions(),
        }
