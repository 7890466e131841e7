"""Retrain the difficulty-aware network's confidence network D to find where its segmenter S is wrong.

The paper (Nie et al., AAAI 2019) means D's confidence map M to mark where the segmentation is
unreliable; trained by Eq. 4 it learns instead to tell a one-hot label from soft probabilities, and
its difficulty map finds the segmenter's errors no better than chance (AUROC 0.585 on the default
package's 40 validation cases). Here S is frozen and D alone learns, per voxel, whether S's arg-max
is right: binary cross-entropy of D(P_hat U X) against 1 where S is right and 0 where it is wrong, so
M estimates the probability that the voxel is right and F = (1 - M)^beta ranks the errors. S's
weights, and so every label and probability, are unchanged.

    python -m training.error_map --model Resources/Models/hippocampus_difficulty_aware --coarse \
        --output runs/difficulty_aware_error_map          # the shipped D: 20 epochs, 3 perturbed copies

D's inputs are what the predictor gives it (``AttnSegLib.inference.maps_on_blended``): S's
probabilities from the product's sliding window (the card's temperature undone) and the normalised
image, padded to whole windows the same way. They are computed once per training case (the cases the
card does not hold out) and per perturbed copy of it (``--perturbed-copies``: the case through S's own
training augmentation, every transform it used on; S errs on its training cases half as often as on new ones,
and on the copies more as on new ones) with S frozen; each epoch visits every case and copy once as one
random window of the padded case, mirrored along the card's test-time flip axes at random. D starts
from the package's weights but for its last layer, which restarts at the prior (weights 0, bias the
log-odds of a right voxel); ``--coarse`` instead builds a new D without its full-resolution level
(``coarse_confidence``), whose prior is M = max_c p_c. Adam, learning rate ``--lr``. The package
written to ``--output`` is the input package with D's new weights (and architecture), its map meanings
and units rewritten and a ``training.confidence_network`` note; measure it, and set its review map, with
``python -m training.map_display``.

Measured on the default package's 40 validation cases (difficulty map; the entropy of the
probabilities: AUROC 0.946, AUPRC 0.370, 89.2 % of the errors within 5 % of the volume):

| D | AUROC | AUPRC | errors in 5 % |
|---|---|---|---|
| Eq. 4 (the paper's training) | 0.585 | 0.025 | |
| paper's D retrained, 40 epochs | 0.983 | 0.336 | 89.8 % |
| coarse, 40 / 120 epochs | 0.976 / 0.981 | 0.354 / 0.337 | 90.8 / 90.3 % |
| coarse, 3 perturbed copies, 20 epochs | 0.986 | 0.375 | 93.0 % |
| coarse, 3 perturbed copies, 40 epochs | 0.986 | 0.366 | 92.7 % |
| **coarse, 3 perturbed copies, 20 epochs, run again (shipped)** | **0.986** | **0.372** | **92.7 %** |

These settings were chosen on the same validation cases, among the first five runs above. The last row is
the same command as the fourth: training on the CPU is not bitwise repeatable here (oneDNN), and two runs
differ by 0.003 in AUPRC.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose
from torch import nn

from AttnSegLib.card import ModelCard
from AttnSegLib.inference import Predictor, pad_to_windows, untempered
from AttnSegLib.package import PackageError, build_from_card, load_package, save_package

from .config import ConfigError, resolve_path
from .data import Case, DatasetError, find_cases, load_cases
from .evaluate import dataset_description, select_split
from .patches import augmentation_transforms

MAP_MEANINGS = {
    "confidence": "Probability in [0, 1] that the segmentation is right at each voxel, as the confidence "
                  "network learned it from where the segmenter was wrong on its training cases (and "
                  "perturbed copies of them). Low values mark voxels to check.",
    "difficulty": "Difficulty (1 - confidence)^{beta:g} in [0, 1]: high where the segmentation is likely "
                  "wrong; the regions to review first.",
}

MAP_UNITS = {"confidence": "probability right (1 = surely right)",
             "difficulty": "(1 - probability right)^{beta:g} (1 = surely wrong)"}


def error_windows(predictor: Predictor, cases) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per case, D's input and target on the case padded to whole windows: (input (C + M, D', H', W'),
    target (1, D', H', W'): 1 where S's arg-max equals the label, 0 where it is wrong, 1 in the padding)."""
    temperature = predictor.card.inference.temperature
    windows = []
    for case in cases:
        probabilities, _ = predictor.predict_array(case.image)
        probabilities = untempered(torch.from_numpy(probabilities)[None], temperature)
        right = torch.from_numpy((probabilities[0].argmax(0).numpy() == case.label).astype(np.float32))
        padded, image, inside = pad_to_windows(probabilities, torch.from_numpy(case.image)[None],
                                               predictor.patch_size)
        target = torch.ones((1, 1, *padded.shape[2:]))
        target[inside] = right
        windows.append((torch.cat([padded, image], dim=1)[0], target[0]))
    return windows


def perturbed_copies(cases: list[Case], augmentation: dict, copies: int, seed: int) -> list[Case]:
    """``copies`` copies of each case through the segmenter's own training augmentation (the card's
    ``training.config.augmentation``) with every transform it used applied (probabilities above 0 set
    to 1, mirroring left out: the windows are mirrored anyway). S has fitted its training cases closer than it fits new
    ones (0.57 % of their voxels wrong against 1.1 % on the validation cases); on perturbed copies it
    errs more as it errs on new cases, so D learns from errors more like those it will meet."""
    settings = {key: (1.0 if key.endswith("_prob") and value > 0 else value) for key, value in augmentation.items()
                if not key.startswith("flip")}  # a transform S was trained without (probability 0) stays off
    transform = Compose(augmentation_transforms(settings))
    out = []
    for copy in range(copies):
        for index, case in enumerate(cases):
            transform.set_random_state(seed=seed + copy * len(cases) + index)
            sample = transform({"image": case.image, "label": case.label[None]})
            label = np.rint(np.asarray(sample["label"])[0]).astype(case.label.dtype)
            out.append(Case(f"{case.name} (perturbed {copy + 1})", np.asarray(sample["image"], dtype=np.float32), label))
    return out


def random_window(volume: torch.Tensor, target: torch.Tensor, patch_size, flip_dims, rng: random.Random):
    """One random ``patch_size`` window of a (K, D, H, W) input and its (1, D, H, W) target, mirrored
    along each of ``flip_dims`` (dims of the (K, D, H, W) tensor) with probability 1/2."""
    corner = [rng.randint(0, s - p) for s, p in zip(volume.shape[1:], patch_size)]
    index = (slice(None),) + tuple(slice(c, c + p) for c, p in zip(corner, patch_size))
    volume, target = volume[index], target[index]
    dims = [d for d in flip_dims if rng.random() < 0.5]
    return (volume.flip(dims), target.flip(dims)) if dims else (volume, target)


def train_confidence_network(network, windows, patch_size, flip_dims, epochs: int, batch_size: int, lr: float,
                             seed: int, log=print) -> list[float]:
    """Train ``network.confidence_net`` alone (S frozen) on ``windows``; returns the mean loss per epoch."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    for parameter in network.segmenter.parameters():
        parameter.requires_grad_(False)
    right = float(torch.cat([t.flatten() for _, t in windows]).mean())
    confidence_net = network.confidence_net
    head = confidence_net.head  # restarts at the prior: Eq. 4's head says "soft, so fake" everywhere
    nn.init.zeros_(head.weight)
    # the prior: M = the share of right voxels, or, for a coarse D, M = max_c p_c (its per-voxel term)
    nn.init.constant_(head.bias, 0.0 if confidence_net.coarse else math.log(right / (1 - right)))
    confidence_net.reset_sureness()
    network.confidence_net.train()
    optimiser = torch.optim.Adam(network.confidence_net.parameters(), lr=lr)
    losses = []
    for epoch in range(epochs):
        order = list(range(len(windows)))
        rng.shuffle(order)
        total, started = 0.0, time.perf_counter()
        for start in range(0, len(order), batch_size):
            pairs = [random_window(*windows[i], patch_size, flip_dims, rng) for i in order[start:start + batch_size]]
            inputs, targets = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            loss = F.binary_cross_entropy_with_logits(network.confidence_net(inputs), targets)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(pairs)
        losses.append(total / len(order))
        log(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.5f} ({time.perf_counter() - started:.0f} s)")
    network.confidence_net.eval()
    return losses


def with_coarse_confidence(card: ModelCard, network):
    """A copy of ``network`` (S weights kept) whose D is a new, untrained coarse one (``coarse_confidence``)."""
    coarse = card.to_dict()
    coarse["architecture"].setdefault("kwargs", {})["coarse_confidence"] = True
    built = build_from_card(coarse)
    built.segmenter.load_state_dict(network.segmenter.state_dict())
    return built.eval()


def error_map_card(card: ModelCard, network, args, cases: int, losses: list[float]) -> dict:
    """The card (JSON) of the package with the retrained D: its architecture, its maps' meanings and
    how D was trained."""
    started_from = "new (coarse_confidence)" if args.coarse else card.get("weights_sha256")
    card = card.to_dict()
    if network.confidence_net.coarse:
        card["architecture"].setdefault("kwargs", {})["coarse_confidence"] = True
    card["maps"] = {name: {"meaning": text.format(beta=network.beta), "unit": MAP_UNITS[name].format(beta=network.beta)}
                    for name, text in MAP_MEANINGS.items()}
    card.setdefault("training", {})["confidence_network"] = {
        "objective": "binary cross-entropy of D(P_hat U X) against where the frozen segmenter's arg-max is right",
        "segmenter": "frozen (weights unchanged)", "cases": cases,
        "perturbed_copies": args.perturbed_copies, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "initialised_from": started_from,
        "final_loss": round(losses[-1], 6) if losses else None,
    }
    return card


def _positive(text: str) -> int:
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return int(text)


def _not_negative(text: str) -> int:
    if int(text) < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.error_map", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a difficulty_aware model package (folder, .zip or name)")
    parser.add_argument("--output", required=True, help="folder for the package with the retrained D")
    parser.add_argument("--data", help="dataset folder or training config (default: the card's dataset)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=_positive, help="only the first N training cases (a quick run)")
    parser.add_argument("--perturbed-copies", type=_not_negative, default=3, metavar="K",
                        help="also train on K copies of each case through the segmenter's training augmentation")
    parser.add_argument("--coarse", action="store_true",
                        help="train a new D without its full-resolution level (coarse_confidence; cheaper) "
                             "instead of retraining the package's")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        package = load_package(args.model)
        if package.card.architecture != "difficulty_aware":
            raise PackageError(f"{package.name} is a {package.card.architecture} package; "
                               "training.error_map retrains a difficulty_aware network's confidence network")
        data, root = dataset_description(package.card, args.data, None)
        files = select_split(find_cases(data, root), package.card, "train")[:args.cases]
        cases = load_cases(files, data)
        if args.perturbed_copies:
            if package.card.training_config is None:
                raise ConfigError(f"the card of {package.name} holds no training config, so not the segmenter's "
                                  "augmentation the perturbed copies go through; pass --perturbed-copies 0")
            cases += perturbed_copies(cases, package.card.training_config.get("augmentation", {}),
                                      args.perturbed_copies, args.seed)
    except (PackageError, ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    predictor = Predictor(package, device="cpu", with_maps=False, localise=False)
    started = time.perf_counter()
    windows = error_windows(predictor, cases)
    wrong = float(np.mean([1 - float(t.mean()) for _, t in windows]))
    print(f"{len(windows)} training cases through the frozen segmenter in {time.perf_counter() - started:.0f} s; "
          f"{100 * wrong:.2f} % of the padded voxels wrong", flush=True)
    network = with_coarse_confidence(package.card, predictor.network) if args.coarse else predictor.network
    flip_dims = [int(a) + 1 for a in package.card.inference.tta_flip_axes]
    losses = train_confidence_network(network, windows, predictor.patch_size, flip_dims, args.epochs,
                                      args.batch_size, args.lr, args.seed, log=lambda m: print(m, flush=True))
    card = error_map_card(package.card, network, args, len(files), losses)
    out = save_package(resolve_path(args.output), card, network.state_dict())
    print(json.dumps({"package": str(out.path), "losses": [round(v, 6) for v in losses]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
