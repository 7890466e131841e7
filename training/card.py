"""The model card (``model.json``) of a network trained from a config.

The same card drives validation during training (``Predictor(network, card=...)``) and the exported
package, so a package predicts exactly as its network was validated.
"""
from __future__ import annotations

from AttnSegLib.models import SegmentationNetwork

CLASS_KEYS = ("value", "name", "color", "terminology")
MODALITY_KEYS = ("name", "contrast", "normalization")


def model_card(config: dict, network: SegmentationNetwork, split: dict[str, list[str]] | None = None,
               metrics: dict | None = None) -> dict:
    """Card for ``network`` trained with ``config``; ``split`` and ``metrics`` fill the training
    provenance and the measured validation metrics when known."""
    data = config["data"]
    card = {
        "name": config["name"],
        "description": config.get("description", ""),
        "architecture": {"name": config["model"]["architecture"], "kwargs": dict(config["model"]["kwargs"])},
        "modalities": [{k: m[k] for k in MODALITY_KEYS if k in m} for m in data["modalities"]],
        "classes": [{k: c[k] for k in CLASS_KEYS if k in c} for c in data["classes"]],
        "spacing_xyz_mm": data.get("spacing_xyz_mm"),
        "orientation": data.get("orientation"),
        "crop_to_nonzero": bool(data.get("crop_to_nonzero", False)),
        "patch_size_dhw": [int(p) for p in config["patch_size"]],
        "inference": {"overlap": config["validation"]["overlap"], "batch_size": config["validation"]["batch_size"],
                      "tta_flip_axes": [int(a) for a in config["augmentation"]["flip_axes"]]},
        "maps": {name: {"meaning": text} for name, text in network.map_descriptions().items()},
        "training": {
            "dataset": data.get("reference") or data["layout"],
            "licence": data.get("licence"),
            "attribution": data.get("attribution"),
            "config": config,
        },
    }
    if split is not None:
        card["training"].update(cases_train=len(split["train"]), cases_validation=len(split["validation"]),
                                validation_cases=list(split["validation"]))
    if metrics is not None:
        card["metrics"] = metrics
    return card
