"""Fine-tuning a shipped model on corrected cases without forgetting what it knew.

A config with ``model.init_from`` starts from that package (the *parent*) and, with the settings of its
optional ``fine_tuning`` section (defaults in :data:`training.config.FINE_TUNING_DEFAULTS`):

* **replay**: the parent's own training cases (its card's dataset minus its validation cases; a seeded
  ``replay_cases`` of them, or all) are mixed into the patches; ``replay_fraction`` of the patches come
  from them, the rest from the corrected cases;
* **changed voxels weighted**: ``changed_voxel_ratio`` of a corrected case's patches are centred on a
  voxel its correction changed (``difference.nii.gz``);
* **freezing**: parameters whose names start with one of ``freeze`` are not trained;
* **reference set**: the parent's validation cases (those not among the corrections; a seeded
  ``reference_cases`` of them, or all) are validated beside
  the corrections' own validation cases, from iteration 0 (the parent's weights) on. A checkpoint is
  only kept as best while its reference Dice stays within ``reference_tolerance`` of iteration 0's, and
  ``training.export`` refuses (unless forced) a model worse than its parent there by more than that.

The run's ``lineage.json`` (parent name and sha256, each correction with the model it came from, the
data mix) becomes the exported card's ``training.lineage``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from AttnSegLib.package import ModelPackage

from .config import FINE_TUNING_DEFAULTS, ConfigError, load_weights_package, resolve_path
from .data import CaseFiles, find_cases

LINEAGE_FILE = "lineage.json"


def settings(config: dict) -> dict:
    """The config's ``fine_tuning`` section completed with the defaults."""
    return {**FINE_TUNING_DEFAULTS, **(config.get("fine_tuning") or {})}


def load_parent(config: dict) -> ModelPackage:
    return load_weights_package(config, "init_from")


@dataclass
class ParentCases:
    """The parent's dataset description and its training (replay) and validation (reference) cases."""

    data: dict
    replay: list[CaseFiles]
    reference: list[CaseFiles]


def _seeded_subset(files: list[CaseFiles], count: int | None, seed: int) -> list[CaseFiles]:
    if count is None or count >= len(files):
        return files
    chosen = np.random.default_rng(seed).choice(len(files), size=int(count), replace=False)
    return [files[i] for i in sorted(chosen)]


def parent_cases(parent: ModelPackage, exclude: set[str], replay_count: int | None, reference_count: int | None,
                 seed: int) -> ParentCases:
    """The parent's cases from its card: its training cases and its validation cases, both without the
    names in ``exclude`` (the corrected cases); ``replay_count`` / ``reference_count``: a seeded subset
    of that many (None: all)."""
    stored, held_out = parent.card.training_config, set(parent.card.held_out_case_names)
    if stored is None or not held_out:
        raise ConfigError(f"model.init_from {parent.name}: its card holds no training config or validation "
                          "cases, so there is nothing to replay or compare with; fine-tune a package trained "
                          "with training/ (or set fine_tuning.replay_fraction: 0)")
    data = stored["data"]
    files = [f for f in find_cases(data, resolve_path(data["root"])) if f.name not in exclude]
    replay = _seeded_subset([f for f in files if f.name not in held_out], replay_count, seed)
    reference = _seeded_subset([f for f in files if f.name in held_out], reference_count, seed)
    return ParentCases(data, replay, reference)


def case_weights(corrections: int, replay: int, replay_fraction: float) -> np.ndarray:
    """Per-case draw weights: ``replay_fraction`` of the patches from the ``replay`` cases, the rest
    from the ``corrections`` (alike within each group)."""
    if not replay:
        return np.ones(corrections)
    return np.concatenate([np.full(corrections, (1.0 - replay_fraction) / corrections),
                           np.full(replay, replay_fraction / replay)])


def freeze(network: torch.nn.Module, prefixes: list[str]) -> int:
    """Stop training the parameters whose names start with one of ``prefixes``; returns how many.
    A prefix that names no parameter is an error (a typo would silently train everything)."""
    names = [name for name, _ in network.named_parameters()]
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name in names):
            tops = sorted({name.split(".")[0] for name in names})
            raise ConfigError(f"fine_tuning.freeze: no parameter starts with {prefix!r}; top-level modules: "
                              f"{', '.join(tops)}")
    frozen = 0
    for name, parameter in network.named_parameters():
        if any(name.startswith(prefix) for prefix in prefixes):
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


def keep_parent_maps(card: dict, parent: ModelPackage, weights: dict[str, torch.Tensor]) -> bool:
    """Into the fine-tuned network's ``card`` (JSON), when its confidence network is the parent's unchanged
    (``fine_tuning.freeze: [confidence_net]``) and the parent's was retrained by :mod:`training.error_map`
    (its card's ``training.confidence_network``): that note and the parent's map meanings and units. The
    network's own text describes the paper's confidence network, not the one the weights hold. ``weights``:
    the fine-tuned network's state. Returns whether they were kept."""
    theirs = parent.card.to_dict()
    note = theirs.get("training", {}).get("confidence_network")
    head = [name for name in parent.weights if name.startswith("confidence_net.")]
    if note is None or not head or not all(torch.equal(parent.weights[n], weights[n]) for n in head):
        return False
    for name, entry in card.get("maps", {}).items():
        spec = theirs.get("maps", {}).get(name, {})
        entry.update({key: spec[key] for key in ("meaning", "unit") if key in spec})
    card["training"]["confidence_network"] = note
    return True


def correction_record(files: CaseFiles) -> dict:
    """One corrected case for the lineage: its name and, from ``case.json``, the model it came from."""
    record = json.loads(files.record.read_text()) if files.record is not None else {}
    return {"case": files.name, "model_name": record.get("model_name"), "model_sha256": record.get("model_sha256"),
            "changed_voxels": record.get("changed_voxels")}


def make_lineage(config: dict, parent: ModelPackage, corrections: list[CaseFiles], replay: list[str],
                 reference: list[str]) -> dict:
    """What the fine-tuned card records of where it came from (see the module docstring)."""
    tuning = settings(config)
    return {
        "parent": {"name": parent.name, "sha256": parent.sha256},
        "corrections": [correction_record(f) for f in corrections],
        "data_mix": {"corrected_cases": len(corrections), "replay_cases": len(replay),
                     "replay_dataset": parent.card.training_dataset,
                     "replay_fraction": tuning["replay_fraction"] if replay else 0.0,
                     "changed_voxel_ratio": tuning["changed_voxel_ratio"], "freeze": list(tuning["freeze"])},
        "reference_cases": list(reference),
        "reference_tolerance": tuning["reference_tolerance"],
    }


def write_lineage(run: Path, lineage: dict) -> None:
    (run / LINEAGE_FILE).write_text(json.dumps(lineage, indent=1) + "\n")


def read_lineage(run: Path) -> dict | None:
    path = run / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def fine_tuned_description(parent: ModelPackage, lineage: dict) -> str:
    mix = lineage["data_mix"]
    return (f"Fine-tuned from {parent.name} (weights sha256 {parent.sha256[:12]}) on {mix['corrected_cases']} "
            f"corrected cases, with {mix['replay_cases']} of its training cases replayed. "
            f"Parent: {parent.card.description}")
