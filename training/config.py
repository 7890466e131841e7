"""Training configurations: one YAML file per experiment, read into a plain nested dict.

Missing optional keys take the defaults below; unknown top-level keys and wrong values are errors that
name the key and the fix. Paths in ``data.root`` and ``output_dir`` are taken relative to the
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
                    whose weights the run starts from (fine-tuning, e.g. on corrected cases)
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
    output_dir      where checkpoints, logs and curves go
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

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
SECTIONS = set(DEFAULTS) | set(REQUIRED)


class ConfigError(ValueError):
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


def validate(config: dict, where: str = "config") -> None:
    unknown = sorted(set(config) - SECTIONS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(SECTIONS))}")
    missing = [k for k in REQUIRED if k not in config] + [f"data.{k}" for k in REQUIRED_DATA
                                                            if k not in config.get("data", {})]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    if "architecture" not in config["model"]:
        raise ConfigError(f"{where}: model.architecture is required (a name from AttnSegLib.models.names())")
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
