"""Model packages: a folder (or one .zip of it) holding ``model.json`` (the card) and
``weights.safetensors``.

Loading validates everything before a network is built: schema version, required keys, the
architecture name, the weights' sha256 against the card, and that every tensor fits the rebuilt
network. Weights are read with safetensors only; nothing is ever unpickled.

Packages are found by name in, in order: ``$ATTNSEG_MODELS`` (paths separated by ``os.pathsep``),
``~/.attnseg/models``, and the shipped ``Resources/Models``.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from . import models
from .image import apply_umask
from .localise import METHOD as LOCALISATION_METHOD
from .localise import TARGETS as LOCALISATION_TARGETS
from .preprocess import NORMALISATIONS

SCHEMA_VERSION = 1
CARD_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
REQUIRED_KEYS = ("schema_version", "name", "architecture", "modalities", "classes", "patch_size_dhw",
                 "weights_sha256")
MAX_ZIP_BYTES = 512 * 1024 * 1024
MAX_PATCH_SIDE = 1024
MAX_PATCH_VOXELS = 256**3  # a window's activations grow with its voxels; nnU-Net's largest 3D patches are ~2e6
SPACING_RANGE_MM = (0.01, 50.0)  # voxel sides of medical volumes; outside it the card's units are wrong
MAX_WINDOW_BATCH = 512
MAX_CLASSES = 2**16  # label maps are written as uint8 up to 256 classes, uint16 up to 65536
_ORIENTATION_AXES = ({"R", "L"}, {"A", "P"}, {"S", "I"})
# What a damaged or hostile zip can raise while being listed or read.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, lzma.LZMAError, EOFError,
               NotImplementedError, RuntimeError, OSError, ValueError, OverflowError, KeyError)
DEFAULT_FILE = "default.txt"


class PackageError(ValueError):
    """A model package cannot be used; the message says which and why."""


def _shipped_models_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    # Repository layout (AttnSegExtension/AttnSegLib -> ../../Resources) and an installed Slicer
    # module (<module dir>/AttnSegLib -> <module dir>/Resources).
    candidates = [here.parents[1] / "Resources" / "Models", here.parent / "Resources" / "Models"]
    return [p for p in candidates if p.is_dir()]


def search_dirs() -> list[Path]:
    env = [Path(p) for p in os.environ.get("ATTNSEG_MODELS", "").split(os.pathsep) if p]
    return [*env, Path.home() / ".attnseg" / "models", *_shipped_models_dirs()]


@dataclass
class ModelPackage:
    """A validated package. ``card``: the parsed model.json; ``weights``: name -> tensor (CPU)."""

    path: Path
    card: dict
    weights: dict[str, torch.Tensor]

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def sha256(self) -> str:
        return self.card["weights_sha256"]

    @property
    def classes(self) -> list[dict]:
        return self.card["classes"]

    @property
    def modalities(self) -> list[dict]:
        return self.card["modalities"]

    @property
    def maps(self) -> dict[str, dict]:
        return self.card.get("maps", {})

    def build_network(self) -> torch.nn.Module:
        """The architecture rebuilt from the card, weights loaded, in eval mode, on the CPU."""
        network = build_from_card(self.card, str(self.path))
        _load_state(network, self.weights, str(self.path))
        return network.eval()

    def summary(self) -> dict:
        return {
            "name": self.name, "path": str(self.path), "architecture": self.card["architecture"]["name"],
            "description": self.card.get("description", ""),
            "modalities": [m["name"] for m in self.modalities],
            "classes": [c["name"] for c in self.classes],
            "maps": sorted(self.maps), "metrics": self.card.get("metrics", {}), "sha256": self.sha256,
        }


def build_from_card(card: dict, where: str = "model card", device: str | torch.device = "cpu") -> torch.nn.Module:
    """The card's architecture; on ``device="meta"`` only its tensor shapes exist (no memory, no init)."""
    arch = card["architecture"]
    try:
        with torch.device(device):
            return models.build(arch["name"], in_channels=len(card["modalities"]),
                                num_classes=len(card["classes"]), **arch.get("kwargs", {}))
    except models.UnknownArchitectureError as err:
        raise PackageError(f"{where}: {err}; update AttnSeg or use a package built for this version") from None
    except Exception as err:  # the card is untrusted input to the constructor: any failure is the card's
        raise PackageError(f"{where}: architecture {arch['name']!r} cannot be built from the card's kwargs "
                           f"({type(err).__name__}: {_one_line(err)})") from None


def _load_state(network: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    _check_shapes(network, weights, where)
    network.load_state_dict(weights, strict=True)


def _check_shapes(network: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor of ``network`` (possibly on the meta device) is in ``weights`` with its shape, and no other."""
    own = network.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    mismatched = [f"{k} {tuple(weights[k].shape)} != {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(weights)) if weights[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise PackageError(f"{where}: the weights do not fit architecture "
                           f"{network.architecture_name!r}: {'; '.join(parts)}")


def _one_line(err: BaseException, limit: int = 200) -> str:
    """An exception's text as one short line (library messages may span lines or quote huge input)."""
    return " ".join(str(err).split())[:limit]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_orientation(value) -> bool:
    return (isinstance(value, str) and len(value) == 3
            and all(sum(letter in axis for letter in value) == 1 for axis in _ORIENTATION_AXES))


def _is_color(value) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in value)


def validate_card(card: dict, where: str) -> None:
    """Check every card field the engine reads, so a bad card fails here and not mid-prediction."""
    def require(condition: bool, message: str) -> None:
        if not condition:
            raise PackageError(f"{where}: {message}")

    require(isinstance(card, dict), f"{CARD_FILE} must hold a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in card]
    require(not missing, f"{CARD_FILE} lacks required key(s) {', '.join(missing)}")
    require(card["schema_version"] == SCHEMA_VERSION,
            f"schema version {card['schema_version']!r} is not supported (this AttnSeg reads version "
            f"{SCHEMA_VERSION}); re-export the package")
    require(isinstance(card["name"], str) and card["name"].strip() != "", "'name' must be a non-empty string")
    arch = card["architecture"]
    require(isinstance(arch, dict) and isinstance(arch.get("name"), str)
            and isinstance(arch.get("kwargs", {}), dict),
            "'architecture' must be an object with a 'name' string and optional 'kwargs' object")
    modalities = card["modalities"]
    require(isinstance(modalities, list) and modalities != []
            and all(isinstance(m, dict) and isinstance(m.get("name"), str) for m in modalities),
            "'modalities' must be a non-empty list of objects with a 'name'")
    unknown = [repr(m["normalization"]) for m in modalities if m.get("normalization", "zscore") not in NORMALISATIONS]
    require(not unknown, f"unknown normalisation {', '.join(unknown)} in 'modalities'; known: {', '.join(NORMALISATIONS)}")
    classes = card["classes"]
    require(isinstance(classes, list) and 2 <= len(classes) <= MAX_CLASSES
            and all(isinstance(c, dict) and _is_int(c.get("value")) and isinstance(c.get("name"), str) for c in classes)
            and [c["value"] for c in classes] == list(range(len(classes))),
            f"'classes' must list 2 to {MAX_CLASSES} objects with a 'name' and values 0..C-1 in order "
            "(background first)")
    require(all(_is_color(c.get("color", [0, 0, 0])) for c in classes),
            "a class 'color' must be three integers from 0 to 255")
    patch = card["patch_size_dhw"]
    require(isinstance(patch, list) and len(patch) == 3 and all(_is_int(p) and 0 < p <= MAX_PATCH_SIDE for p in patch),
            f"'patch_size_dhw' must be three integers from 1 to {MAX_PATCH_SIDE}")
    require(math.prod(patch) <= MAX_PATCH_VOXELS,
            f"'patch_size_dhw' {patch} holds {math.prod(patch)} voxels, more than the {MAX_PATCH_VOXELS} (256^3) "
            "a window can have")
    spacing = card.get("spacing_xyz_mm")
    low, high = SPACING_RANGE_MM
    require(spacing is None or (isinstance(spacing, list) and len(spacing) == 3
                                and all(_is_number(v) and low <= v <= high for v in spacing)),
            f"'spacing_xyz_mm' must be null or three numbers from {low} to {high} (mm), not {spacing!r:.80}")
    require(card.get("orientation") is None or _is_orientation(card["orientation"]),
            f"'orientation' must be null or three letters such as 'RAS' (one of R/L, A/P, S/I each), "
            f"not {card.get('orientation')!r}")
    require(isinstance(card.get("crop_to_nonzero", False), bool), "'crop_to_nonzero' must be true or false")
    settings = card.get("inference", {})
    require(isinstance(settings, dict), "'inference' must be an object")
    require(_is_number(settings.get("overlap", 0.5)) and 0 <= settings.get("overlap", 0.5) < 1,
            "'inference.overlap' must be a number from 0 to below 1")
    require(_is_int(settings.get("batch_size", 2)) and 1 <= settings.get("batch_size", 2) <= MAX_WINDOW_BATCH,
            f"'inference.batch_size' must be an integer from 1 to {MAX_WINDOW_BATCH}")
    axes = settings.get("tta_flip_axes", [0, 1, 2])
    require(isinstance(axes, list) and all(_is_int(a) and 0 <= a <= 2 for a in axes) and len(set(axes)) == len(axes),
            "'inference.tta_flip_axes' must list distinct axes among 0, 1, 2")
    temperature = settings.get("temperature", 1.0)
    require(_is_number(temperature) and 0.05 <= temperature <= 20,
            f"'inference.temperature' must be a number from 0.05 to 20 (the logits' calibration scale, 1 = none), "
            f"not {temperature!r}")
    field_of_view = settings.get("training_field_of_view_mm")
    require(field_of_view is None or (isinstance(field_of_view, list) and len(field_of_view) == 3
                                      and all(_is_number(v) and v > 0 for v in field_of_view)),
            "'inference.training_field_of_view_mm' must be null or three positive numbers (x, y, z mm)")
    localisation = settings.get("localisation")
    require(localisation is None or (isinstance(localisation, dict)
                                     and localisation.get("method") == LOCALISATION_METHOD
                                     and isinstance(localisation.get("targets"), list) and localisation["targets"]
                                     and all(t in LOCALISATION_TARGETS for t in localisation["targets"])),
            f"'inference.localisation' must be null or {{\"method\": \"{LOCALISATION_METHOD}\", \"targets\": [...]}} "
            f"with targets among {', '.join(LOCALISATION_TARGETS)}")
    require(localisation is None or field_of_view is not None,
            "'inference.localisation' needs 'inference.training_field_of_view_mm' (what to localise to)")
    maps = card.get("maps", {})
    require(isinstance(maps, dict) and all(isinstance(v, dict) for v in maps.values()),
            "'maps' must be an object of map name -> {meaning, read}")
    review = settings.get("review_map", "uncertainty")
    require(review == "uncertainty" or review in maps,
            f"'inference.review_map' must be 'uncertainty' or one of the card's maps, not {review!r}")
    require(isinstance(card["weights_sha256"], str), "'weights_sha256' must be a hex string")


def _read_zip(path: Path) -> tuple[bytes, bytes]:
    try:
        archive = zipfile.ZipFile(path)
    except _ZIP_ERRORS as err:
        raise PackageError(f"{path}: not a valid zip archive ({type(err).__name__}); a model package is a "
                           f"folder or .zip holding {CARD_FILE} and {WEIGHTS_FILE}") from None
    with archive:
        entries: dict[str, list[zipfile.ZipInfo]] = {}
        for info in archive.infolist():
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            if info.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise PackageError(f"{path}: refused, entry {info.filename!r} points outside the package "
                                   "(path traversal)")
            if parts and not info.is_dir():
                entries.setdefault(parts[-1], []).append(info)
        total = sum(i.file_size for infos in entries.values() for i in infos)
        if total > MAX_ZIP_BYTES:
            raise PackageError(f"{path}: refused, it unpacks to {total} bytes (limit {MAX_ZIP_BYTES})")
        for needed in (CARD_FILE, WEIGHTS_FILE):
            if needed not in entries:
                raise PackageError(f"{path}: the archive has no {needed}")
            if len(entries[needed]) > 1:
                raise PackageError(f"{path}: refused, the archive holds {len(entries[needed])} files named {needed}; "
                                   "a package holds exactly one")
        try:
            return archive.read(entries[CARD_FILE][0]), archive.read(entries[WEIGHTS_FILE][0])
        except _ZIP_ERRORS as err:
            raise PackageError(f"{path}: the archive is damaged ({type(err).__name__}: {_one_line(err)}); "
                               "download the package again") from None


def _read_folder(path: Path) -> tuple[bytes, bytes]:
    for needed in (CARD_FILE, WEIGHTS_FILE):
        if not (path / needed).is_file():
            raise PackageError(f"{path}: the package folder has no {needed}")
    return (path / CARD_FILE).read_bytes(), (path / WEIGHTS_FILE).read_bytes()


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A package path from a path or a name found in :func:`search_dirs`."""
    candidate = Path(name_or_path)
    if candidate.exists():
        return candidate
    for folder in search_dirs():
        for option in (folder / str(name_or_path), folder / f"{name_or_path}.zip"):
            if option.exists():
                return option
    known = ", ".join(p.name for p in available_packages()) or "none"
    raise PackageError(f"no model package {str(name_or_path)!r}; installed packages: {known} "
                       "(give a package name or the path of a package folder/.zip)")


def load_package(name_or_path: str | os.PathLike) -> ModelPackage:
    path = resolve(name_or_path)
    card_bytes, weight_bytes = _read_zip(path) if path.is_file() else _read_folder(path)
    try:
        card = json.loads(card_bytes)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, absurd numbers or nesting
        raise PackageError(f"{path}: {CARD_FILE} is not valid JSON ({_one_line(err)})") from None
    validate_card(card, str(path))
    digest = hashlib.sha256(weight_bytes).hexdigest()
    if digest != card["weights_sha256"]:
        raise PackageError(f"{path}: weights sha256 {digest[:12]}... does not match the card's "
                           f"{str(card['weights_sha256'])[:12]}...; the file was altered or damaged")
    try:
        weights = load_safetensors(weight_bytes)
    except (SafetensorError, ValueError) as err:
        raise PackageError(f"{path}: {WEIGHTS_FILE} is not a valid safetensors file ({_one_line(err)})") from None
    # Shapes are checked on the meta device: a hostile card cannot make us allocate a huge network.
    network = build_from_card(card, str(path), device="meta")
    _check_shapes(network, weights, str(path))
    if any(side % network.divisor for side in card["patch_size_dhw"]):
        raise PackageError(f"{path}: 'patch_size_dhw' {card['patch_size_dhw']} must be multiples of "
                           f"{network.divisor} for architecture {card['architecture']['name']!r}")
    return ModelPackage(path, card, weights)


def save_package(out_dir: str | os.PathLike, card: dict, state_dict: dict[str, torch.Tensor]) -> ModelPackage:
    """Write ``card`` (completed with schema version and weights hash) and the weights; reload to check."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state_dict.items()}
    weights_path = out / WEIGHTS_FILE
    save_file(tensors, str(weights_path), metadata={"format": "pt", "name": card.get("name", "")})
    apply_umask(weights_path)
    card = {**card, "schema_version": SCHEMA_VERSION,
            "weights_sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest()}
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return load_package(out)


def available_packages() -> list[Path]:
    """Every package folder or .zip in the search directories (first of each name wins)."""
    found: dict[str, Path] = {}
    for folder in search_dirs():
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            is_pkg = (entry.is_dir() and (entry / CARD_FILE).is_file()) or entry.suffix == ".zip"
            name = entry.stem if entry.suffix == ".zip" else entry.name
            if is_pkg and name not in found:
                found[name] = entry
    return list(found.values())


def default_package_name() -> str:
    env = os.environ.get("ATTNSEG_DEFAULT_MODEL")
    if env:
        return env
    for folder in _shipped_models_dirs():
        marker = folder / DEFAULT_FILE
        if marker.is_file():
            return marker.read_text().strip()
    raise PackageError("no default model is configured: pass --model NAME_OR_PATH "
                       "(see `attnseg info` for installed packages)")


def default_package() -> ModelPackage:
    return load_package(default_package_name())
