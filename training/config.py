"""Training configurations: one YAML file per experiment, read into a plain nested dict.

Missing optional keys take the defaults below. Unknown keys at any depth (``training.iteration``),
``model.kwargs`` the architecture's constructor does not take, ``loss.weights`` its loss does not take,
a ``model.init_from`` package that does not load and wrong values are errors that name the key (its
dotted path) and the fix. Paths in ``data.root`` and ``output_dir`` are taken relative to the
repository root when not absolute, so a config runs the same from any working directory.

A config may start from another with ``base: <name or path>`` (resolved next to it, then in
``training/configs``) and override only what differs; mappings merge key by key, anything else is
replaced, and so are ``model.kwargs`` and ``loss.weights`` (they belong to one architecture).

Top-level keys::

    base            config to start from (optional)
    name            run / package name
    description     one line for the model card (optional)
    seed            one integer seeds the split, the weights and every patch (exact resume)
    data            layout, root, modalities, classes, spacing_xyz_mm, orientation, crop_to_nonzero,
                    validation_fraction, licence, attribution, reference
    model           architecture (registry name) and kwargs; ``init_from`` (optional): a model package
                    whose weights the run starts from (fine-tuning, e.g. on corrected cases);
                    ``warm_start`` (optional): a model package (an earlier stage, exported) whose
                    weights the run starts from on the same data (a second stage, e.g. after changing a
                    setting that holds no parameter); its name, sha256 and training budget go into the card
    patch_size      [D, H, W] in voxels of the model frame
    batch_size      patches per step and process
    sampling        foreground_ratio (pos/neg crops) or class_ratios (one weight per class)
    optimizer       name (adam | adamw | sgd) and its settings; ``confidence`` for a second network
    schedule        name (constant | poly | cosine | step | warm_restarts) and its settings
    loss            name and weights (given to the architecture's loss)
    augmentation    flips, rotation, scaling, intensity shift/scale, noise (probabilities and ranges)
    training        iterations, iterations_per_epoch, accumulation, amp, validation_interval,
                    early_stopping, num_workers, checkpoint_interval
    validation      overlap, batch_size, max_cases
    fine_tuning     (optional, with model.init_from) replay_fraction, replay_cases, changed_voxel_ratio,
                    freeze, reference_tolerance, reference_cases: see :mod:`training.finetune`
    output_dir      where checkpoints, logs and curves go
"""
from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path

import yaml

from AttnSegLib.errors import AttnSegError

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

DEFAULTS: dict = {
    "description": "",
    "seed": 0,
    "data": {
        "spacing_xyz_mm": None,
        "orientation": None,
        "crop_to_nonzero": False,
        "validation_fraction": 0.2,
        "licence": None,
        "attribution": None,
        "reference": None,
    },
    "model": {"kwargs": {}},
    "sampling": {"foreground_ratio": 0.67, "class_ratios": None},
    "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-5, "momentum": 0.99, "nesterov": True},
    "schedule": {"name": "poly", "power": 0.9, "warmup_iterations": 0},
    "loss": {"name": "default", "weights": {}},
    "augmentation": {
        "flip_axes": [0, 1, 2],
        "flip_prob": 0.5,
        "affine_prob": 0.2,
        "rotate_deg": 15.0,
        "scale": [0.85, 1.25],
        "intensity_shift_prob": 0.2,
        "intensity_shift": 0.1,
        "intensity_scale_prob": 0.2,
        "intensity_scale": 0.1,
        "noise_prob": 0.1,
        "noise_std": 0.1,
    },
    "training": {
        "iterations": 1000,
        "iterations_per_epoch": 250,
        "accumulation": 1,
        "amp": True,
        "validation_interval": 250,
        "early_stopping": {"patience": None, "min_delta": 0.0},
        "num_workers": 0,
        "checkpoint_interval": None,
    },
    "validation": {"overlap": 0.5, "batch_size": 4, "max_cases": None},
}
REQUIRED = ("name", "data", "model", "patch_size", "batch_size", "output_dir")
REQUIRED_DATA = ("layout", "root", "modalities", "classes")
SECTIONS = set(DEFAULTS) | set(REQUIRED) | {"fine_tuning"}

# Every key a config may hold, at every depth: a set lists leaf keys, a dict maps keys to their own
# schema, and a list ``[schema]`` is a list of entries that each follow ``schema``. ``model.kwargs`` and
# ``loss.weights`` are checked against the architecture's constructor and loss instead (see validate).
_OPTIMIZER = {"name", "lr", "weight_decay", "momentum", "nesterov", "grad_clip"}
_SCHEDULE = {"name", "power", "min_factor", "gamma", "step_epochs", "period_epochs", "warmup_iterations"}
SCHEMA: dict = {
    "name": None, "description": None, "seed": None, "patch_size": None, "batch_size": None, "output_dir": None,
    "data": {"layout": None, "root": None, "label_pattern": None, "spacing_xyz_mm": None, "orientation": None,
             "crop_to_nonzero": None, "validation_fraction": None, "licence": None, "attribution": None,
             "reference": None, "localisation": {"method", "targets"},
             "modalities": [{"name", "pattern", "contrast", "normalization"}],
             "classes": [{"value", "name", "color", "source_value", "terminology"}]},
    "model": {"architecture": None, "kwargs": None, "init_from": None, "warm_start": None},
    "sampling": {"foreground_ratio", "class_ratios"},
    "optimizer": {**dict.fromkeys(_OPTIMIZER), "confidence": _OPTIMIZER},
    "schedule": {**dict.fromkeys(_SCHEDULE), "confidence": _SCHEDULE},
    "loss": {"name": None, "weights": None},
    "augmentation": set(DEFAULTS["augmentation"]),
    "training": {**dict.fromkeys(DEFAULTS["training"]), "early_stopping": {"patience", "min_delta"},
                 "find_unused_parameters": None},
    "validation": set(DEFAULTS["validation"]),
    "fine_tuning": {"replay_fraction", "replay_cases", "changed_voxel_ratio", "freeze", "reference_tolerance",
                    "reference_cases"},
}
# What fine-tuning uses for the keys a ``fine_tuning`` section leaves out (see training.finetune).
FINE_TUNING_DEFAULTS = {"replay_fraction": 0.5, "replay_cases": None, "changed_voxel_ratio": 0.3, "freeze": [],
                        "reference_tolerance": 0.005, "reference_cases": None}


class ConfigError(AttnSegError, ValueError):
    """A configuration cannot be used; the message names the key and what to write instead."""


REPLACED_WHOLE = (("model", "kwargs"), ("loss", "weights"))


def _merge(defaults: dict, given: dict, where: tuple[str, ...] = ()) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        path = where + (key,)
        mergeable = isinstance(out.get(key), dict) and isinstance(value, dict) and path not in REPLACED_WHOLE
        out[key] = _merge(out[key], value, path) if mergeable else copy.deepcopy(value)
    return out


def resolve_path(path: str | os.PathLike) -> Path:
    """An absolute path, with ``~`` and ``$VARS`` expanded; relative paths are from the repository root."""
    p = Path(os.path.expandvars(os.path.expanduser(str(path))))
    return p if p.is_absolute() else REPO / p


def find_config(name_or_path: str | os.PathLike, beside: Path | None = None) -> Path:
    """A config file from a path or a bare name in ``training/configs`` (``ci`` -> ``configs/ci.yaml``);
    ``beside``: a folder searched first (a ``base`` is resolved next to the config naming it)."""
    candidate = Path(name_or_path)
    for folder in ([beside] if beside else []) + [Path.cwd(), CONFIG_DIR]:
        for option in (folder / candidate, folder / f"{name_or_path}.yaml"):
            if option.is_file():
                return option
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"no config {str(name_or_path)!r}: give a YAML path or one of: {known}")


def _read(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The mapping in ``path`` merged over its ``base`` chain."""
    if path.resolve() in chain:
        raise ConfigError(f"{path}: 'base' configs form a cycle ({' -> '.join(p.name for p in chain)})")
    try:
        given = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(given, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    base = given.pop("base", None)
    if base is None:
        return given
    return _merge(_read(find_config(base, path.parent), chain + (path.resolve(),)), given)


def load_config(name_or_path: str | os.PathLike, overrides: dict | None = None) -> dict:
    """Read (with its ``base`` chain), complete with defaults, and validate a config; ``overrides``
    are merged last."""
    path = find_config(name_or_path)
    config = _merge(DEFAULTS, _merge(_read(path), overrides or {}))
    validate(config, str(path))
    return config


# Names other tools use for a key, for the "did you mean" of a key that is not spelt like ours.
SYNONYMS = {"learning_rate": "lr", "epochs": "iterations", "max_iterations": "iterations", "steps": "iterations",
            "normalisation": "normalization", "license": "licence"}


def _suggest(key: str, known) -> str:
    if SYNONYMS.get(str(key)) in known:
        return f"did you mean {SYNONYMS[str(key)]!r}?"
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(map(str, known)))}"


def check_keys(value, schema, where: str, path: str = "") -> None:
    """Refuse any key ``schema`` does not list, naming its dotted path and the closest known key."""
    if schema is None:
        return
    if isinstance(schema, list):
        for index, entry in enumerate(value if isinstance(value, list) else []):
            check_keys(entry, schema[0], where, f"{path}[{index}]")
        return
    if not isinstance(value, dict):
        if path:  # a section given as a scalar
            raise ConfigError(f"{where}: {path} must be a mapping of keys to values, got {value!r}")
        return
    for key in value:
        if key not in schema:
            name = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{where}: unknown key {name}; {_suggest(key, schema)}")
        if isinstance(schema, dict):
            check_keys(value[key], schema[key], where, f"{path}.{key}" if path else str(key))


def check_model(config: dict, where: str) -> None:
    """``model.kwargs`` against the architecture's constructor and ``loss.weights`` against its loss."""
    from AttnSegLib import models  # noqa: PLC0415  (torch only when a config is validated)

    from .objectives import loss_parameters

    model = config["model"]
    if model["architecture"] not in models.names():
        raise ConfigError(f"{where}: model.architecture {model['architecture']!r} is unknown; "
                          f"{_suggest(model['architecture'], models.names())}")
    kwargs = model["kwargs"] or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{where}: model.kwargs must be a mapping of argument names to values")
    try:
        models.resolved_kwargs(model["architecture"], **kwargs)
    except TypeError:
        accepted = models.resolved_kwargs(model["architecture"])
        bad = next(k for k in kwargs if k not in accepted)
        raise ConfigError(f"{where}: unknown key model.kwargs.{bad} for {model['architecture']}; "
                          f"{_suggest(bad, accepted)}") from None
    weights = config["loss"].get("weights") or {}
    accepted = loss_parameters(model["architecture"], config["loss"].get("name", "default"))
    for key in weights:
        if accepted is not None and key not in accepted:
            raise ConfigError(f"{where}: unknown key loss.weights.{key} for {model['architecture']}'s loss; "
                              f"{_suggest(key, accepted)}")


def check_init_from(config: dict, where: str) -> None:
    """``model.init_from`` must name a package that loads (name in the search path, folder or .zip).
    ``model.warm_start`` names an earlier stage's output, which may not exist yet: the trainer checks it."""
    from AttnSegLib.package import PackageError  # noqa: PLC0415

    if config["model"].get("init_from") is not None:
        try:
            load_weights_package(config, "init_from")
        except PackageError as err:
            raise ConfigError(f"{where}: model.init_from cannot be used: {err}") from None
    if config["model"].get("init_from") and config["model"].get("warm_start"):
        raise ConfigError(f"{where}: model.init_from and model.warm_start both name starting weights; keep one")


def load_weights_package(config: dict, key: str):
    """The package that ``model.<key>`` (``init_from`` or ``warm_start``) names: a package name in the
    search path, or a folder or .zip path (relative to the repository root)."""
    from AttnSegLib.package import load_package  # noqa: PLC0415

    source = config["model"][key]
    return load_package(resolve_path(source) if "/" in str(source) or os.sep in str(source) else source)


def validate(config: dict, where: str = "config") -> None:
    check_keys(config, SCHEMA, where)
    missing = [k for k in REQUIRED if k not in config] + [f"data.{k}" for k in REQUIRED_DATA
                                                            if k not in config.get("data", {})]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    if "architecture" not in config["model"]:
        raise ConfigError(f"{where}: model.architecture is required (a name from AttnSegLib.models.names())")
    check_model(config, where)
    check_init_from(config, where)
    patch = config["patch_size"]
    if not (isinstance(patch, list) and len(patch) == 3 and all(isinstance(p, int) and p > 0 for p in patch)):
        raise ConfigError(f"{where}: patch_size must be three positive integers [D, H, W], got {patch!r}")
    classes = config["data"]["classes"]
    if [c.get("value") for c in classes] != list(range(len(classes))) or len(classes) < 2:
        raise ConfigError(f"{where}: data.classes must list values 0..C-1 in order, background first "
                          "(use source_value for the value stored in the label files)")
    if not config["data"]["modalities"] or not all("name" in m for m in config["data"]["modalities"]):
        raise ConfigError(f"{where}: data.modalities must be a non-empty list of entries with a name")
    fraction = config["data"]["validation_fraction"]
    if not 0 < fraction < 1:
        raise ConfigError(f"{where}: data.validation_fraction must be between 0 and 1, got {fraction}")
    for key in ("batch_size",):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ConfigError(f"{where}: {key} must be a positive integer, got {config[key]!r}")
    training = config["training"]
    for key in ("iterations", "iterations_per_epoch", "accumulation", "validation_interval"):
        if not isinstance(training[key], int) or training[key] < 1:
            raise ConfigError(f"{where}: training.{key} must be a positive integer, got {training[key]!r}")
    tuning = config.get("fine_tuning")
    if tuning is not None:
        if not config["model"].get("init_from"):
            raise ConfigError(f"{where}: fine_tuning needs model.init_from (the package to fine-tune)")
        for key in ("replay_fraction", "changed_voxel_ratio"):
            value = tuning.get(key, FINE_TUNING_DEFAULTS[key])
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ConfigError(f"{where}: fine_tuning.{key} must be between 0 and 1, got {value!r}")
