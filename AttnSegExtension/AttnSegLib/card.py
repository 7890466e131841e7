"""The model card (``model.json``): parsed and validated once into a frozen, typed :class:`ModelCard`.

Every default a card may leave out lives here (:class:`InferenceSettings`), and every reader — package
loading, the Predictor, ``training/export.py``, the command line, the Slicer panel and the web app —
asks the card through its fields and accessors (:attr:`ModelCard.validation_dice`, ...), never through
the JSON keys. The JSON format is unchanged: :meth:`ModelCard.to_dict` gives back the object it was
parsed from, so shipped packages load as they are and their weights' sha256 stays the same.

For the modules that still read the card as a dictionary, a :class:`ModelCard` is also a read-only
``Mapping`` of its JSON (each value a copy).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .errors import AttnSegError
from .localise import METHOD as LOCALISATION_METHOD
from .localise import TARGETS as LOCALISATION_TARGETS
from .preprocess import NORMALISATIONS

SCHEMA_VERSION = 1
CARD_FILE = "model.json"
REQUIRED_KEYS = ("schema_version", "name", "architecture", "modalities", "classes", "patch_size_dhw",
                 "weights_sha256")
MAX_PATCH_SIDE = 1024
MAX_PATCH_VOXELS = 256**3  # a window's activations grow with its voxels; nnU-Net's largest 3D patches are ~2e6
SPACING_RANGE_MM = (0.01, 50.0)  # voxel sides of medical volumes; outside it the card's units are wrong
MAX_WINDOW_BATCH = 512
MAX_CLASSES = 2**16  # label maps are written as uint8 up to 256 classes, uint16 up to 65536
UNCERTAINTY = "uncertainty"  # the map every result has: normalised entropy of the class probabilities
ENSEMBLE = "ensemble"  # the architecture of a card that averages member packages (``kwargs: {"members": [...]}``)
_ORIENTATION_AXES = ({"R", "L"}, {"A", "P"}, {"S", "I"})


class PackageError(AttnSegError, ValueError):
    """A model package cannot be used; the message says which and why."""


@dataclass(frozen=True)
class InferenceSettings:
    """The card's ``inference`` section, with the defaults a card may leave out.

    ``overlap``: fraction of a window shared with its neighbour; ``batch_size``: windows per forward pass;
    ``tta_flip_axes``: spatial axes (0 = D, 1 = H, 2 = W) the model is symmetric along; ``temperature``:
    the logits' calibration scale (1 = none); ``review_map``: the map doubtful regions are ranked by (None:
    the model's ``difficulty`` map when it has one, else the uncertainty);
    ``training_field_of_view_mm``: (x, y, z) extent of the training crops, or None; ``localisation``:
    how to find the structure in a larger image (``{"method", "targets"}``), or None.
    """

    overlap: float = 0.5
    batch_size: int = 2
    tta_flip_axes: tuple[int, ...] = (0, 1, 2)
    temperature: float = 1.0
    review_map: str | None = None
    training_field_of_view_mm: tuple[float, float, float] | None = None
    localisation: Mapping | None = None

    @classmethod
    def from_dict(cls, section: dict) -> "InferenceSettings":
        defaults = cls()
        field_of_view = section.get("training_field_of_view_mm")
        localisation = section.get("localisation")
        return cls(overlap=float(section.get("overlap", defaults.overlap)),
                   batch_size=int(section.get("batch_size", defaults.batch_size)),
                   tta_flip_axes=tuple(int(a) for a in section.get("tta_flip_axes", defaults.tta_flip_axes)),
                   temperature=float(section.get("temperature", defaults.temperature)),
                   review_map=section.get("review_map", defaults.review_map),
                   training_field_of_view_mm=tuple(float(v) for v in field_of_view) if field_of_view else None,
                   localisation=_frozen(localisation) if localisation else None)


@dataclass(frozen=True)
class MapSpec:
    """One of the model's own maps as its card describes it: what the values mean, how to read them,
    and optionally the range to display them on (the values at the first and the last colour; high to
    low for a map high where the segmentation is sure) and their unit."""

    name: str
    meaning: str = ""
    read: str = ""
    display_range: tuple[float, float] | None = None
    unit: str | None = None


@dataclass(frozen=True, eq=False)
class ModelCard(Mapping):
    """A validated ``model.json``. Build with :meth:`parse`; never mutated.

    ``classes``/``modalities``: the card's objects (read-only), classes with values 0..C-1 in order
    (background first); ``patch_size_dhw``: the window (D, H, W) in voxels; ``spacing_xyz_mm`` and
    ``orientation``: the model frame (None: the input's own); ``input_statistics``: the training
    intensity profile per modality, or None; ``maps``: name -> :class:`MapSpec`; ``metrics`` and
    ``training``: what export measured and recorded (read-only).
    """

    name: str
    description: str
    architecture: str
    architecture_kwargs: Mapping
    modalities: tuple[Mapping, ...]
    classes: tuple[Mapping, ...]
    patch_size_dhw: tuple[int, int, int]
    spacing_xyz_mm: tuple[float, float, float] | None
    orientation: str | None
    crop_to_nonzero: bool
    input_statistics: object
    inference: InferenceSettings
    maps: Mapping
    metrics: Mapping
    training: Mapping
    purpose: str | None
    weights_sha256: str
    schema_version: int
    _source: dict = field(repr=False)

    @classmethod
    def parse(cls, data: dict, where: str = "model card", saved: bool = True) -> "ModelCard":
        """Validate ``data`` (see :func:`validate_card`) and freeze it. ``saved=False``: the card of a network
        not yet written as a package (training), which has no weights hash or schema version yet."""
        if isinstance(data, ModelCard):
            return data
        if not saved and isinstance(data, dict):
            data = {"schema_version": SCHEMA_VERSION, "weights_sha256": "", **data}
        validate_card(data, where)
        source = copy.deepcopy(data)
        spacing = source.get("spacing_xyz_mm")
        maps = {name: MapSpec(name, str(entry.get("meaning", "")), str(entry.get("read", "")),
                              tuple(float(v) for v in entry["display_range"]) if entry.get("display_range") else None,
                              entry.get("unit"))
                for name, entry in source.get("maps", {}).items()}
        return cls(name=source["name"], description=str(source.get("description", "")),
                   architecture=source["architecture"]["name"],
                   architecture_kwargs=_frozen(source["architecture"].get("kwargs", {})),
                   modalities=tuple(_frozen(m) for m in source["modalities"]),
                   classes=tuple(_frozen(c) for c in source["classes"]),
                   patch_size_dhw=tuple(source["patch_size_dhw"]),
                   spacing_xyz_mm=tuple(float(v) for v in spacing) if spacing else None,
                   orientation=source.get("orientation"), crop_to_nonzero=bool(source.get("crop_to_nonzero", False)),
                   input_statistics=_frozen(source.get("input_statistics")),
                   inference=InferenceSettings.from_dict(source.get("inference", {})),
                   maps=MappingProxyType(maps), metrics=_frozen(source.get("metrics") or {}),
                   training=_frozen(source.get("training") or {}), purpose=source.get("purpose"),
                   weights_sha256=source["weights_sha256"], schema_version=source["schema_version"],
                   _source=source)

    # -- accessors ------------------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.classes]

    @property
    def modality_names(self) -> list[str]:
        return [m["name"] for m in self.modalities]

    @property
    def members(self) -> tuple[str, ...]:
        """The names of the member packages of an ensemble card (architecture ``ensemble``); () for one network."""
        return tuple(self.architecture_kwargs.get("members", ())) if self.architecture == ENSEMBLE else ()

    @property
    def network_kwargs(self) -> dict:
        """The architecture's keyword arguments as plain (new) JSON data, to build the network with."""
        return _thawed(self.architecture_kwargs)

    @property
    def class_dicts(self) -> list[dict]:
        """The classes as plain (new) dictionaries, e.g. for a :class:`~AttnSegLib.inference.Result`."""
        return [_thawed(c) for c in self.classes]

    @property
    def modality_dicts(self) -> list[dict]:
        return [_thawed(m) for m in self.modalities]

    @property
    def validation_dice(self) -> float | None:
        """Mean foreground Dice on the validation cases, as ``training/export.py`` measured it
        (``metrics.mean_dice``), or None when the card has none."""
        value = self.metrics.get("mean_dice")
        return float(value) if _is_number(value) else None

    @property
    def validation_split(self) -> str:
        """Where :attr:`validation_dice` was measured (``validation``, or a named split)."""
        return str(self.metrics.get("split", "validation"))

    @property
    def validation_cases(self) -> int | None:
        cases = self.metrics.get("cases")
        return cases if _is_int(cases) else None

    def per_class_dice(self) -> dict[str, float]:
        """Class name -> validation Dice (``metrics.dice``), empty when the card has none."""
        dice = self.metrics.get("dice")
        return {str(k): float(v) for k, v in dice.items() if _is_number(v)} if isinstance(dice, Mapping) else {}

    @property
    def training_config(self) -> dict | None:
        """The training configuration the network was trained with (``training.config``) as plain (new)
        JSON data, or None when the card has none (a package not trained with ``training/``)."""
        config = self.training.get("config")
        return _thawed(config) if config is not None else None

    @property
    def held_out_case_names(self) -> list[str]:
        """The names of the validation cases the network was not trained on (``training.validation_cases``)."""
        return list(self.training.get("validation_cases") or [])

    @property
    def training_dataset(self) -> str | None:
        """What the network was trained on, in words (``training.dataset``), or None."""
        return self.training.get("dataset")

    def with_temperature(self, temperature: float) -> "ModelCard":
        """This card with the logits' calibration scale ``inference.temperature`` set to ``temperature``."""
        source = self.to_dict()
        source["inference"] = {**source.get("inference", {}), "temperature": temperature}
        return ModelCard.parse(source, saved=False)

    def map_meaning(self, name: str) -> str:
        """What the model's map ``name`` (or a channel of it, ``name.channel``) means, as its card says."""
        spec = self.map_spec(name)
        return spec.meaning if spec is not None else ""

    def map_reading(self, name: str) -> str:
        spec = self.map_spec(name)
        return spec.read if spec is not None else ""

    def map_spec(self, name: str) -> MapSpec | None:
        """The card's entry for map ``name``: its own, else its family's (``spatial_attention`` for
        ``spatial_attention.level1``), else None."""
        return self.maps.get(name) or self.maps.get(name.split(".")[0])

    def error_detection_auroc(self, map_name: str) -> float | None:
        """How well ``map_name`` finds the model's wrong voxels (AUROC on the validation cases), or None."""
        scores = self.metrics.get("error_detection_auroc")
        value = scores.get(map_name) if isinstance(scores, Mapping) else None
        return float(value) if _is_number(value) else None

    def map_information(self, volume: str) -> Mapping | None:
        """What the card measured of map volume ``volume`` (``spatial_attention.level1``,
        ``category_attention.anterior``) on its validation cases: the figures of
        :func:`AttnSegLib.map_information.map_information` averaged over the cases
        (``metrics.map_information``, written by ``training.map_display``), or None."""
        information = self.metrics.get("map_information")
        figures = information.get(volume) if isinstance(information, Mapping) else None
        return figures if isinstance(figures, Mapping) else None

    def to_dict(self) -> dict:
        """The card as JSON data (a copy of what it was parsed from)."""
        return copy.deepcopy(self._source)

    # -- read-only Mapping of the JSON, for readers not yet moved to the fields ----------------------------
    def __getitem__(self, key: str):
        return copy.deepcopy(self._source[key])

    def __iter__(self):
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)

    def __eq__(self, other) -> bool:
        if isinstance(other, ModelCard):
            return self._source == other._source
        return isinstance(other, Mapping) and self._source == dict(other)

    __hash__ = None

    def __copy__(self) -> "ModelCard":
        return self  # immutable

    def __deepcopy__(self, memo) -> "ModelCard":
        return self

    def __reduce__(self):
        return ModelCard.parse, (self._source,)


def _thawed(value):
    """Plain JSON data (new dicts and lists) from :func:`_frozen` data."""
    if isinstance(value, Mapping):
        return {k: _thawed(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


def _frozen(value):
    """A read-only view of JSON data: objects as ``MappingProxyType``, lists as tuples."""
    if isinstance(value, dict):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


# -- validation ----------------------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_orientation(value) -> bool:
    return (isinstance(value, str) and len(value) == 3
            and all(sum(letter in axis for letter in value) == 1 for axis in _ORIENTATION_AXES))


def _is_color(value) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in value)


def _is_map_entry(entry) -> bool:
    """``{"meaning", "read", "display_range": [first, last], "unit"}``, every key optional; the display
    range gives the values at the first and the last colour, high to low for a map high where the
    segmentation is sure."""
    if not isinstance(entry, dict):
        return False
    display = entry.get("display_range")
    return (display is None or (isinstance(display, list) and len(display) == 2 and all(map(_is_number, display))
                                and display[0] != display[1])) and (
        entry.get("unit") is None or isinstance(entry["unit"], str))


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
    if arch["name"] == ENSEMBLE:
        members = arch.get("kwargs", {}).get("members")
        require(set(arch.get("kwargs", {})) == {"members"} and isinstance(members, list) and len(members) >= 2
                and all(isinstance(m, str) and m.strip() for m in members) and len(set(members)) == len(members),
                "an ensemble's 'architecture.kwargs' must be {\"members\": [two or more distinct package names]}")
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
    require(isinstance(maps, dict) and all(_is_map_entry(v) for v in maps.values()),
            "'maps' must be an object of map name -> {meaning, read, display_range: [first, last] (two different "
            "numbers), unit}")
    review = settings.get("review_map", "uncertainty")
    require(review == "uncertainty" or review in maps,
            f"'inference.review_map' must be 'uncertainty' or one of the card's maps, not {review!r}")
    require(isinstance(card["weights_sha256"], str), "'weights_sha256' must be a hex string")
