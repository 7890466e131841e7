"""Train the click refinement network of :mod:`AttnSegLib.refine` and export it as a package.

Samples are made the way DeepEdit and nnInteractive train: a training case, the current probabilities
of a shipped segmentation model on it (sometimes perturbed by a smooth random field, so the errors are
as varied as on unseen cases), 0 to ``MAX_ROUNDS`` rounds of simulated clicks each applied with the
network being trained (no gradient), then one more click whose crop is the training example: input
image + current probabilities + click maps, target the expert label. The loss is weighted as the
update is applied (1 up to FULL_UPDATE_MM from the click, nothing from RADIUS_MM on) and
``COMPONENT_WEIGHT`` times more on the clicked error region, the part the user asked to fix. Clicks are the standard simulated
user's (deepest point of the largest error) or, for variety, a random point of a random error region.
Only training-split cases are read: the validation cases of the base models' cards are excluded.

Real corrections (``--corrections``: cases saved with "Save as training case" or ``exportCorrection``,
layout ``corrected``, whose ``case.json`` keeps the refinement clicks) train the network alongside the
simulated ones (``--real-fraction`` of the examples): the model named in ``case.json`` (its weights hash
checked) is run again on the saved image, the user's earlier clicks are replayed with the network being
trained, and the next recorded click is the training example, its target the corrected label.

    python -m training.refine_train --data ../shared/data/hippocampus \\
        --base hippocampus_difficulty_aware hippocampus_unet --minutes 30 --crop 24 \\
        --init Resources/Models/refinement/hippocampus_click_refiner --out runs/refine_hippocampus \\
        --corrections ~/attnseg_corrections
    python -m training.refine_train --record-metrics Resources/Models/refinement/<name> \
        benchmarks/results/interactive.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from AttnSegLib import models
from AttnSegLib.corrected_case import MODEL_LABEL_FILE
from AttnSegLib.image import Geometry, read_image
from AttnSegLib.inference import Predictor
from AttnSegLib.localise import sub_geometry
from AttnSegLib.package import PackageError, load_package, save_package
from AttnSegLib.refine import (FULL_UPDATE_MM, PURPOSE, RADIUS_MM, Click, LearnedUpdate, Refiner, class_index,
                               class_parts, click_voxel, merge_parts, refined_probabilities, simulated_click,
                               to_frame, voxel_click)

from .data import DatasetError, check_label_values, corrected_cases, label_lookup, msd_cases

MAX_ROUNDS = 3
COMPONENT_WEIGHT = 4.0
FEATURES = (8, 16, 32, 64)


REAL_FRACTION = 0.5
REPRODUCED = 0.999  # a saved correction's model result must be reproduced on this fraction of its voxels


class Sample:
    """One training case on its input grid: ``image`` (M, D, H, W) float32, ``label`` (D, H, W) class indices,
    ``base`` model name -> (C, D, H, W) float16 probabilities; ``clicks``: a real correction's clicks in
    the order the user made them (classes of the refinement network), empty for a simulated case."""

    def __init__(self, name: str, image: np.ndarray, label: np.ndarray, geometry: Geometry, base: dict,
                 clicks: list[Click] = ()):
        self.name, self.image, self.label, self.geometry, self.base = name, image, label, geometry, base
        self.clicks = list(clicks)


def load_samples(root: Path, base_names: list[str], cache: Path) -> tuple[list[Sample], dict]:
    """Training cases (never a base card's validation case) with each base model's probabilities."""
    cards = [load_package(n).card for n in base_names]
    held_out = set().union(*(c["training"]["validation_cases"] for c in cards))
    lookup = label_lookup(cards[0]["classes"])
    files = [f for f in msd_cases(root, 1) if f.name not in held_out]
    stored = dict(np.load(cache)) if cache.is_file() else {}
    predictors = {n: Predictor(load_package(n), device="cpu", with_maps=False) for n in base_names}
    samples = []
    for f in files:
        image = read_image(f.images[0])
        label = read_image(f.label)
        base = {}
        for name, predictor in predictors.items():
            key = f"{f.name}:{name}"
            if key not in stored:
                stored[key] = predictor.predict([image]).probabilities.array.astype(np.float16)
            base[name] = stored[key]
        samples.append(Sample(f.name, image.array[None].astype(np.float32),
                              check_label_values(label.array, lookup, str(f.label)), image.geometry, base))
    np.savez(cache, **stored)
    return samples, {"held_out": sorted(held_out), "train": [s.name for s in samples], "card": cards[0]}


def load_corrections(root: Path, card: dict, margin_mm: float, cache: Path) -> tuple[list[Sample], list[str]]:
    """The saved corrections under ``root`` (layout ``corrected``) that hold refinement clicks, as
    :class:`Sample` s in the classes of the refinement ``card`` (a localised whole head's "Left anterior
    hippocampus" is its ``Anterior``): the saved image, the probabilities of the model named in
    ``case.json`` run again on it (refused when its weights hash differs from the recorded one or its
    labels do not reproduce the saved model result), the corrected label and the clicks. Each is cut to
    the box of its clicks plus ``margin_mm`` (no click's update or crop reaches past it), so a whole
    head costs what a crop costs. -> (samples, one line per case left out and why)."""
    network_classes = [c["name"] for c in card["classes"]]
    stored = dict(np.load(cache)) if cache.is_file() else {}
    predictors: dict[str, Predictor] = {}
    samples, left_out = [], []
    for files in corrected_cases(root, len(card["modalities"])):
        record = json.loads(files.record.read_text()) if files.record else {}
        if not record.get("clicks"):
            left_out.append(f"{files.name}: no refinement clicks in case.json")
            continue
        try:
            sample, probabilities = _correction_sample(files, record, network_classes, margin_mm, stored, predictors)
        except (DatasetError, PackageError, ValueError) as err:
            left_out.append(f"{files.name}: {err}")
            continue
        stored[_cache_key(files.name, record)] = probabilities
        samples.append(sample)
    np.savez(cache, **stored)
    return samples, left_out


def _cache_key(name: str, record: dict) -> str:
    return f"{name}:{record.get('model_sha256')}"


def _correction_sample(files, record: dict, network_classes: list[str], margin_mm: float, stored: dict,
                       predictors: dict) -> tuple[Sample, np.ndarray]:
    """One saved correction -> (its :class:`Sample`, its (C, d, h, w) float16 model probabilities in the
    network's classes, cut to the sample's box), the probabilities from ``stored`` when there."""
    classes = record["classes"]
    parts = class_parts(classes, network_classes)
    parts = np.arange(len(classes)) if parts is None else parts
    label = read_image(files.label)
    images = [read_image(p) for p in files.images]
    if any(not img.geometry.same_grid(label.geometry) for img in images):
        raise DatasetError("its images and label are not on one grid")
    geometry = label.geometry
    names = [c["name"] for c in classes]
    clicks = [Click(tuple(float(v) for v in c["position_lps"]), class_index(c["class"], names))
              for c in record["clicks"]]
    voxels = np.array([click_voxel(c, geometry) for c in clicks])
    spacing = np.asarray(geometry.spacing, dtype=float)[::-1]
    margin = np.ceil(margin_mm / spacing).astype(int)
    box = tuple(slice(max(0, int(np.floor(lo)) - m), min(n, int(np.ceil(hi)) + m + 1))
                for lo, hi, m, n in zip(voxels.min(axis=0), voxels.max(axis=0), margin, label.array.shape))
    key = _cache_key(files.name, record)
    if key in stored:
        probabilities = stored[key]
    else:
        model = record.get("model_name")
        if model not in predictors:
            package = load_package(model)
            if package.sha256 != record.get("model_sha256"):
                raise DatasetError(f"model {model} is not the one that made it (weights hash differs)")
            predictors[model] = Predictor(package, device="cpu", with_maps=False)
        full = predictors[model].predict(images).probabilities.array
        if len(full) != len(classes):
            raise DatasetError(f"model {model} gives {len(full)} classes here, case.json records {len(classes)}")
        model_label = check_label_values(read_image(files.images[0].parent / MODEL_LABEL_FILE).array,
                                         label_lookup(classes), MODEL_LABEL_FILE)
        agreement = float(np.mean(full.argmax(axis=0) == model_label))
        if agreement < REPRODUCED:
            raise DatasetError(f"model {model} run again agrees with the saved result on {agreement:.1%} of the "
                               "voxels only")
        probabilities = merge_parts(full[(slice(None), *box)], parts, len(network_classes)).astype(np.float16)
    truth = parts[check_label_values(label.array, label_lookup(classes), str(files.label))[box]].astype(np.uint8)
    image = np.stack([img.array[box].astype(np.float32) for img in images])
    network_clicks = [Click(c.position_lps, int(parts[c.label])) for c in clicks]
    sample = Sample(f"correction:{files.name}", image, truth, sub_geometry(geometry, box),
                    {record.get("model_name"): probabilities}, network_clicks)
    return sample, probabilities


def perturbed(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Probabilities with a smooth random field (sigma 3-6 voxels, amplitude up to 3) added to their logits."""
    logits = np.log(np.clip(probabilities.astype(np.float32), 1e-4, 1.0))
    sigma, amplitude = rng.uniform(3, 6), rng.uniform(0.5, 3.0)
    for channel in logits:
        field = ndimage.gaussian_filter(rng.standard_normal(channel.shape).astype(np.float32), sigma)
        channel += amplitude * field / (field.std() + 1e-6)
    out = np.exp(logits - logits.max(axis=0))
    return out / out.sum(axis=0)


def training_click(labels: np.ndarray, truth: np.ndarray, spacing, rng) -> tuple[tuple[int, int, int], int]:
    """The standard simulated click (70 %), or a random voxel of a random error region (30 %; a random
    voxel of the case with its true class when there is no error)."""
    errors = labels != truth
    if errors.any() and rng.random() < 0.7:
        return simulated_click(labels, truth, spacing)
    if not errors.any():
        index = tuple(int(rng.integers(n)) for n in truth.shape)
        return index, int(truth[index])
    components, count = ndimage.label(errors)
    sizes = np.bincount(components.ravel())[1:]
    chosen = rng.choice(count, p=sizes / sizes.sum()) + 1
    voxels = np.argwhere(components == chosen)
    index = tuple(int(v) for v in voxels[rng.integers(len(voxels))])
    return index, int(truth[index])


def make_example(sample: Sample, updater: LearnedUpdate, rng) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ((1, M + 2C, S, S, S) input, (1, S, S, S) target, (1, S, S, S) loss weight) after
    0..MAX_ROUNDS simulated rounds; S = ``updater.size``. A real correction's sample replays its own
    clicks instead (:func:`make_real_example`)."""
    if sample.clicks:
        return make_real_example(sample, updater, rng)
    spacing = np.asarray(sample.geometry.spacing)[::-1]
    probs = sample.base[list(sample.base)[rng.integers(len(sample.base))]].astype(np.float32)
    if rng.random() < 0.5:
        probs = perturbed(probs, rng)
    refiner = Refiner("learned", learned=updater)
    history = []
    labels = probs.argmax(axis=0)
    for _ in range(rng.integers(MAX_ROUNDS + 1)):
        index, label = training_click(labels, sample.label, spacing, rng)
        click = voxel_click(index, label, sample.geometry)
        refined = refiner.refine(sample.image, probs, sample.geometry, [click], history)
        history.append(click)
        probs, labels = refined.probabilities, refined.labels
    index, label = training_click(labels, sample.label, spacing, rng)
    return example_at(sample, updater, probs, labels, history, np.asarray(index, dtype=float), label, rng)


def make_real_example(sample: Sample, updater: LearnedUpdate, rng) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A real correction's example: its first k recorded clicks (k random) replayed with the network
    being trained (no gradient) on the model's probabilities, then click k + 1 as the user made it."""
    probs = next(iter(sample.base.values())).astype(np.float32)
    k = int(rng.integers(len(sample.clicks)))
    history = sample.clicks[:k]
    if history:
        refined = Refiner("learned", learned=updater).refine(sample.image, probs, sample.geometry, history)
        probs, labels = refined.probabilities, refined.labels
    else:
        labels = probs.argmax(axis=0)
    click = sample.clicks[k]
    return example_at(sample, updater, probs, labels, history, click_voxel(click, sample.geometry), click.label, rng)


def example_at(sample: Sample, updater: LearnedUpdate, probs: np.ndarray, labels: np.ndarray, history: list[Click],
               voxel: np.ndarray, label: int, rng) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training example of a click of class ``label`` at array index ``voxel`` (continuous), after
    the ``history`` clicks gave ``probs`` (C, D, H, W) and ``labels`` (D, H, W)."""
    spacing = np.asarray(sample.geometry.spacing)[::-1]
    seen = [(click_voxel(c, sample.geometry), c.label) for c in history] + [(voxel, label)]
    x, start, frame = updater.inputs(sample.image, probs, sample.geometry, voxel, seen)
    target = crop_label(sample.label, start, updater.size)
    y = torch.from_numpy(to_frame(target[None], frame)[0].astype(np.int64))[None]
    weight = torch.from_numpy(to_frame(loss_weight(labels, sample.label, voxel, start, updater.size, spacing)[None],
                                       frame)[0])[None]
    if rng.random() < 0.5:  # left-right mirror: the last frame axis is R-L
        x, y, weight = torch.flip(x, [4]), torch.flip(y, [3]), torch.flip(weight, [3])
    return x, y, weight


def loss_weight(labels: np.ndarray, truth: np.ndarray, voxel: np.ndarray, start: np.ndarray, size: int,
                spacing) -> np.ndarray:
    """(size,)*3 float32 from ``start``: the update's weight around the click at ``voxel`` (1 up to
    FULL_UPDATE_MM, 0 from RADIUS_MM on), times 1 + COMPONENT_WEIGHT on the clicked error region."""
    grids = np.meshgrid(*[(np.arange(size) + s - v) * sp for s, v, sp in zip(start, voxel, spacing)],
                        indexing="ij", sparse=True)
    distance = np.sqrt(sum(g ** 2 for g in grids))
    weight = np.clip((RADIUS_MM - distance) / (RADIUS_MM - FULL_UPDATE_MM), 0.0, 1.0).astype(np.float32)
    components, _ = ndimage.label(labels != truth)
    clicked = components[tuple(np.round(voxel).astype(int))]
    if clicked:
        weight *= 1.0 + COMPONENT_WEIGHT * crop_label(components == clicked, start, size)
    return weight


def crop_label(label: np.ndarray, start: np.ndarray, size: int) -> np.ndarray:
    """(size,)*3 crop of ``label`` from ``start``; background beyond the image."""
    out = np.zeros((size,) * 3, dtype=label.dtype)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, label.shape)
    out[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))] = label[tuple(slice(a, b) for a, b in zip(lo, hi))]
    return out


def loss_fn(probabilities: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy plus weighted soft Dice over the foreground classes; probabilities
    (N, C, S, S, S), target and weight (N, S, S, S)."""
    ce = F.nll_loss(probabilities.clamp_min(1e-6).log(), target, reduction="none")
    ce = (ce * weight).sum() / weight.sum().clamp_min(1e-6)
    one_hot = F.one_hot(target, probabilities.shape[1]).permute(0, 4, 1, 2, 3).float()
    w = weight[:, None]
    dims = (0, 2, 3, 4)
    dice = ((2 * (w * probabilities * one_hot).sum(dims) + 1)
            / ((w * probabilities).sum(dims) + (w * one_hot).sum(dims) + 1))
    return ce + (1 - dice[1:]).mean()


def refinement_card(base_card: dict, split: dict, args) -> dict:
    return {
        "name": args.name,
        "purpose": PURPOSE,
        "description": ("Click refinement network for the anterior and posterior hippocampus: image + current "
                        f"class probabilities + Gaussian click maps (one per class) in a {args.crop} mm cube -> new "
                        "probabilities (AttnSegLib.refine, method 'learned')."),
        "architecture": {"name": "click_refiner", "kwargs": {"features": list(FEATURES)}},
        "modalities": base_card["modalities"],
        "classes": base_card["classes"],
        "spacing_xyz_mm": base_card["spacing_xyz_mm"],
        "orientation": base_card["orientation"],
        "crop_to_nonzero": False,
        "patch_size_dhw": [args.crop] * 3,
        "training": {
            "dataset": base_card["training"]["dataset"], "licence": base_card["training"]["licence"],
            "attribution": base_card["training"]["attribution"],
            "base_models": args.base, "cases_train": len(split["train"]),
            "validation_cases": split["held_out"],
            "simulated_rounds": f"0..{MAX_ROUNDS} earlier clicks per sample, then the trained click",
            "real_corrections": {"cases": len(split["corrections"]["cases"]), "clicks": split["corrections"]["clicks"],
                                 "share_of_examples": split["corrections"]["real_fraction"]},
            "loss": (f"cross-entropy + soft Dice weighted by the update's weight, x{1 + COMPONENT_WEIGHT:g} on the "
                     "clicked error region"),
            "initialised_from": args.init,
            "iterations": args.iterations_done, "batch_size": args.batch_size, "minutes": round(args.minutes_done, 1),
            "lr": args.lr, "seed": args.seed, "command": "python -m training.refine_train " + " ".join(args.argv),
        },
    }


def record_metrics(package_dir: Path, report: dict) -> None:
    """Write the learned method's validation figures of ``benchmarks/interactive.py`` (its JSON report)
    into the package card (``metrics``); the weights and their hash are untouched."""
    card_path = package_dir / "model.json"
    card = json.loads(card_path.read_text())
    measured = report["methods"]["learned"]
    card["metrics"] = {
        "split": "validation", "cases": report["cases"], "segmentation_model": report["model"],
        "simulated_user": "deepest point of the largest error component, up to "
                          f"{report['clicks_per_case']} clicks", "measured_by": "benchmarks/interactive.py",
        **{key: measured[key] for key in ("dice_by_clicks", "auc", "clicks_to_90", "seconds_per_click_median",
                                          "seconds_per_click_p95", "far_changed_voxels")},
        "machine": report["machine"],
    }
    card_path.write_text(json.dumps(card, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record-metrics", nargs=2, type=Path, metavar=("PACKAGE", "REPORT"),
                        help="only write the interactive benchmark's REPORT (json) into PACKAGE's card")
    parser.add_argument("--data", help="MSD hippocampus folder (dataset.json, imagesTr, labelsTr)")
    parser.add_argument("--base", nargs="+", help="segmentation packages whose results are refined")
    parser.add_argument("--minutes", type=float, default=30.0, help="training time budget")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="hippocampus_click_refiner")
    parser.add_argument("--crop", type=int, default=24, help="cube the network sees, voxels of the card's spacing")
    parser.add_argument("--init", help="a refinement package whose weights start the training")
    parser.add_argument("--out", help="run folder (probability cache, log, package/)")
    parser.add_argument("--corrections", type=Path,
                        help="saved corrections (layout corrected) whose recorded clicks train alongside the simulated ones")
    parser.add_argument("--real-fraction", type=float, default=REAL_FRACTION,
                        help="share of the examples drawn from the real corrections, when there are any")
    parser.add_argument("--iterations", type=int, help="stop after this many iterations (else the --minutes budget)")
    args = parser.parse_args(argv)
    if args.record_metrics:
        package_dir, report = args.record_metrics
        record_metrics(package_dir, json.loads(report.read_text()))
        return 0
    if not (args.data and args.base and args.out):
        parser.error("training needs --data, --base and --out")
    args.argv = sys.argv[1:] if argv is None else argv
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples, split = load_samples(Path(args.data), args.base, out / "base_probabilities.npz")
    print(f"{len(samples)} training cases; {len(split['held_out'])} held out", flush=True)
    corrections = []
    if args.corrections:
        margin_mm = RADIUS_MM + args.crop * max(split["card"]["spacing_xyz_mm"])
        corrections, left_out = load_corrections(args.corrections, split["card"], margin_mm,
                                                 out / "correction_probabilities.npz")
        for line in left_out:
            print(f"correction left out: {line}", flush=True)
        print(f"{len(corrections)} saved corrections with {sum(len(c.clicks) for c in corrections)} clicks", flush=True)
    split["corrections"] = {"cases": [c.name.split(":", 1)[1] for c in corrections],
                            "clicks": sum(len(c.clicks) for c in corrections),
                            "real_fraction": args.real_fraction if corrections else 0.0}
    card_classes = len(split["card"]["classes"])
    network = models.build("click_refiner", 1, card_classes, features=FEATURES)
    if args.init:
        network.load_state_dict(load_package(args.init).build_network().state_dict())
    updater = LearnedUpdate(network, {**split["card"], "patch_size_dhw": [args.crop] * 3})
    optimizer = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=1e-4)
    budget, started, step, log = args.minutes * 60, time.perf_counter(), 0, []
    while (elapsed := time.perf_counter() - started) < budget and step != args.iterations:
        network.eval()
        drawn = [corrections[rng.integers(len(corrections))]
                 if corrections and rng.random() < args.real_fraction else samples[rng.integers(len(samples))]
                 for _ in range(args.batch_size)]
        batch = [make_example(sample, updater, rng) for sample in drawn]
        x, y, weight = (torch.cat([b[i] for b in batch]) for i in range(3))
        network.train()
        for group in optimizer.param_groups:
            group["lr"] = args.lr * (1 - elapsed / budget) ** 0.9
        loss = loss_fn(refined_probabilities(network, x, card_classes), y, weight)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
        optimizer.step()
        step += 1
        log.append({"step": step, "seconds": round(elapsed, 1), "loss": round(loss.item(), 4)})
        if step % 20 == 0:
            recent = np.mean([entry["loss"] for entry in log[-20:]])
            print(f"step {step} {elapsed / 60:.1f} min loss {recent:.4f}", flush=True)
    args.iterations_done, args.minutes_done = step, (time.perf_counter() - started) / 60
    (out / "log.json").write_text(json.dumps(log) + "\n")
    package = save_package(out / "package", refinement_card(split["card"], split, args), network.state_dict())
    print(f"package {package.path} ({step} iterations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
