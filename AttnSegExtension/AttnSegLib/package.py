"""Model packages: a folder (or one .zip of it) holding ``model.json`` (the card) and
``weights.safetensors``.

Loading validates everything before a network is built: schema version, required keys, the
architecture name, the weights' sha256 against the card, and that every tensor fits the rebuilt
network. Weights are read with safetensors only; nothing is ever unpickled.

An ensemble package (architecture ``ensemble``) is a folder holding ``model.json`` alone: its card names
member packages (``architecture.kwargs.members``), each loaded by name as above and validated as usual,
and its ``weights_sha256`` is :func:`ensemble_sha256` of theirs, so a member replaced since the card was
written is refused. Every member must have the ensemble's classes, modalities, spacing, orientation and
cropping; no member may itself be an ensemble. The network is :class:`~AttnSegLib.models.ensemble.Ensemble`.

Packages are found by name in, in order: ``$ATTNSEG_MODELS`` (paths separated by ``os.pathsep``),
``~/.attnseg/models``, and the shipped ``Resources/Models``.
"""
from __future__ import annotations

import hashlib
import json
import lzma
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
from .card import ENSEMBLE, SCHEMA_VERSION, ModelCard
# The card's schema lives in .card; these names stay importable from here, where they were defined before.
from .card import CARD_FILE, MAX_CLASSES, PackageError, validate_card  # noqa: F401
from .image import apply_umask
from .models.ensemble import Ensemble

WEIGHTS_FILE = "weights.safetensors"
MAX_ZIP_BYTES = 512 * 1024 * 1024
# What a damaged or hostile zip can raise while being listed or read.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, lzma.LZMAError, EOFError,
               NotImplementedError, RuntimeError, OSError, ValueError, OverflowError, KeyError)
DEFAULT_FILE = "default.txt"


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
    """A validated package. ``card``: the parsed model.json (:class:`~AttnSegLib.card.ModelCard`);
    ``weights``: name -> tensor (CPU); ``members``: an ensemble's member packages (empty otherwise,
    and an ensemble's ``weights`` are empty)."""

    path: Path
    card: ModelCard
    weights: dict[str, torch.Tensor]
    members: tuple["ModelPackage", ...] = ()

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def sha256(self) -> str:
        return self.card.weights_sha256

    @property
    def classes(self) -> list[dict]:
        return self.card.class_dicts

    @property
    def modalities(self) -> list[dict]:
        return self.card.modality_dicts

    @property
    def maps(self) -> dict[str, dict]:
        """The card's ``maps`` section as JSON data (name -> {meaning, read, ...})."""
        return self.card.get("maps", {})

    def build_network(self) -> torch.nn.Module:
        """The architecture rebuilt from the card, weights loaded, in eval mode, on the CPU."""
        if self.members:
            return Ensemble([m.build_network() for m in self.members],
                            [m.card.inference.temperature for m in self.members]).eval()
        network = build_from_card(self.card, str(self.path))
        _load_state(network, self.weights, str(self.path))
        return network.eval()

    def summary(self) -> dict:
        card = self.card
        return {
            "name": self.name, "path": str(self.path), "architecture": card.architecture,
            "description": card.description, "modalities": card.modality_names, "classes": card.class_names,
            "maps": sorted(card.maps), "metrics": card.get("metrics", {}), "validation_dice": card.validation_dice,
            "sha256": self.sha256, **({"members": [m.name for m in self.members]} if self.members else {}),
        }


def build_from_card(card: ModelCard | dict, where: str = "model card",
                    device: str | torch.device = "cpu") -> torch.nn.Module:
    """The card's architecture; on ``device="meta"`` only its tensor shapes exist (no memory, no init)."""
    card = ModelCard.parse(card, where, saved=False)
    try:
        with torch.device(device):
            return models.build(card.architecture, in_channels=len(card.modalities),
                                num_classes=len(card.classes), **card.network_kwargs)
    except models.UnknownArchitectureError as err:
        raise PackageError(f"{where}: {err}; update AttnSeg or use a package built for this version") from None
    except Exception as err:  # the card is untrusted input to the constructor: any failure is the card's
        raise PackageError(f"{where}: architecture {card.architecture!r} cannot be built from the card's kwargs "
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


def _read_folder(path: Path) -> tuple[bytes, bytes | None]:
    """(card bytes, weights bytes or None when the folder has none: an ensemble's)."""
    if not (path / CARD_FILE).is_file():
        raise PackageError(f"{path}: the package folder has no {CARD_FILE}")
    weights = path / WEIGHTS_FILE
    return (path / CARD_FILE).read_bytes(), weights.read_bytes() if weights.is_file() else None


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


def load_package(name_or_path: str | os.PathLike, *, member: bool = False) -> ModelPackage:
    """The validated package ``name_or_path``; ``member``: loaded as an ensemble's member, so it may not
    be an ensemble itself (which also stops an ensemble that lists itself)."""
    path = resolve(name_or_path)
    card_bytes, weight_bytes = _read_zip(path) if path.is_file() else _read_folder(path)
    try:
        card = json.loads(card_bytes)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, absurd numbers or nesting
        raise PackageError(f"{path}: {CARD_FILE} is not valid JSON ({_one_line(err)})") from None
    card = ModelCard.parse(card, str(path))
    if card.architecture == ENSEMBLE:
        if member:
            raise PackageError(f"{path} is itself an ensemble; list its members instead")
        return _load_ensemble(path, card)
    if weight_bytes is None:
        raise PackageError(f"{path}: the package folder has no {WEIGHTS_FILE}")
    digest = hashlib.sha256(weight_bytes).hexdigest()
    if digest != card.weights_sha256:
        raise PackageError(f"{path}: weights sha256 {digest[:12]}... does not match the card's "
                           f"{card.weights_sha256[:12]}...; the file was altered or damaged")
    try:
        weights = load_safetensors(weight_bytes)
    except (SafetensorError, ValueError) as err:
        raise PackageError(f"{path}: {WEIGHTS_FILE} is not a valid safetensors file ({_one_line(err)})") from None
    # Shapes are checked on the meta device: a hostile card cannot make us allocate a huge network.
    network = build_from_card(card, str(path), device="meta")
    _check_shapes(network, weights, str(path))
    if any(side % network.divisor for side in card.patch_size_dhw):
        raise PackageError(f"{path}: 'patch_size_dhw' {list(card.patch_size_dhw)} must be multiples of "
                           f"{network.divisor} for architecture {card.architecture!r}")
    return ModelPackage(path, card, weights)


# What every member of an ensemble shares with its card: card key -> how to read it from a ModelCard.
_ENSEMBLE_FACTS = (("classes", lambda c: [(k["value"], k["name"]) for k in c.classes]),
                   ("modalities", lambda c: [(m["name"], m.get("normalization", "zscore")) for m in c.modalities]),
                   ("spacing_xyz_mm", lambda c: c.spacing_xyz_mm), ("orientation", lambda c: c.orientation),
                   ("crop_to_nonzero", lambda c: c.crop_to_nonzero))


def ensemble_sha256(members: list[ModelPackage]) -> str:
    """An ensemble's ``weights_sha256``: the sha256 of its members' weights hashes, one a line, in order."""
    return hashlib.sha256("".join(f"{m.sha256}\n" for m in members).encode()).hexdigest()


def _load_ensemble(path: Path, card: ModelCard) -> ModelPackage:
    """The member packages of the ensemble card ``card`` loaded and checked against it (module docstring)."""
    members = []
    for name in card.members:
        try:
            member = load_package(name, member=True)
        except PackageError as err:
            raise PackageError(f"{path}: ensemble member {name!r} cannot be used ({_one_line(err, 300)})") from None
        for key, fact in _ENSEMBLE_FACTS:
            if fact(member.card) != fact(card):
                raise PackageError(f"{path}: ensemble member {name!r} has {key} {fact(member.card)}, the ensemble "
                                   f"{fact(card)}; every member must segment the same classes from the same input")
        members.append(member)
    if ensemble_sha256(members) != card.weights_sha256:
        raise PackageError(f"{path}: a member package changed since the ensemble card was written (weights "
                           f"sha256 {ensemble_sha256(members)[:12]}... != {card.weights_sha256[:12]}...); write "
                           "the ensemble again with python -m training.ensemble")
    network = Ensemble([build_from_card(m.card, str(m.path), device="meta") for m in members],
                       [m.card.inference.temperature for m in members])
    if any(side % network.divisor for side in card.patch_size_dhw):
        raise PackageError(f"{path}: 'patch_size_dhw' {list(card.patch_size_dhw)} must be multiples of "
                           f"{network.divisor} for every member")
    return ModelPackage(path, card, {}, tuple(members))


def save_package(out_dir: str | os.PathLike, card: ModelCard | dict,
                 state_dict: dict[str, torch.Tensor]) -> ModelPackage:
    """Write ``card`` (completed with schema version and weights hash) and the weights; reload to check."""
    card = card.to_dict() if isinstance(card, ModelCard) else card
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
