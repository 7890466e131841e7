"""The training loop: patches in, checkpoints, validation Dice, logs and curves out.

One :class:`Trainer` per run folder::

    run/config.yaml                    the config as run
    run/split.json                     the seeded train / validation split
    run/checkpoints/last.safetensors   weights at the last checkpoint (safetensors)
    run/checkpoints/last.pt            optimiser, scheduler, scaler, RNG states, history
                                       (tensors and plain values only: read with weights_only=True)
    run/checkpoints/best.safetensors   weights with the best validation mean foreground Dice
    run/metrics.json                   the best validation metrics
    run/lineage.json                   fine-tuning (model.init_from): parent, corrections, data mix
    run/warm_start.json                model.warm_start: the starting package's name, sha256 and budget
    run/curves.png                     loss and Dice curves
    run/tensorboard/                   TensorBoard event files

Exact resume: the weights, the optimiser and scheduler states, the gradient scaler, every RNG state,
the history and the early-stopping counters are restored, and every patch is a pure function of
``(seed, sample index)`` (:mod:`training.patches`), so a run stopped and resumed ends with the same
weights as one run straight through.

A resumed run may change only the keys in :data:`CHANGEABLE_ON_RESUME` (e.g. ``training.iterations``);
the change is applied, written to ``config.yaml`` and recorded in the history (``config_changes``). Any
other change is refused, naming each changed key.

Fine-tuning (``model.init_from``, :mod:`training.finetune`): the parent's weights, its training cases
replayed beside the corrected cases, patches around the changed voxels, optional frozen parameters, and
validation from iteration 0 on the corrections' validation cases and on the parent's (the reference).

Validation runs the product's own ``AttnSegLib.inference.Predictor`` (sliding window, Gaussian
blending) on whole validation cases in the model frame. Under ``torchrun`` (``WORLD_SIZE`` > 1) the
network is wrapped in DistributedDataParallel; rank 0 validates, logs and writes checkpoints.

Architectures whose loss is an ``AlternatingLoss`` (difficulty_aware) train in two steps per
iteration, as in their paper: the segmentation network with its own optimiser, then the confidence
network (``network.confidence_net``) with another.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from monai.metrics import compute_dice
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from AttnSegLib import models
from AttnSegLib.errors import AttnSegError
from AttnSegLib.models import SegOutput
from AttnSegLib.inference import Predictor, resolve_device
from AttnSegLib.image import apply_umask
from AttnSegLib.package import ModelPackage, PackageError

from . import finetune
from .card import model_card
from .config import ConfigError, load_weights_package, resolve_path
from .plots import plot_curves
from .data import Case, find_cases, load_cases, load_or_make_split
from .losses import AlternatingLoss
from .objectives import build_loss
from .patches import IterationBatches, PatchDataset
from .schedules import build_optimizer, build_scheduler

LOG_EVERY = 10
WARM_START_FILE = "warm_start.json"
# The keys (dotted, or a section) a resumed run may change; any other change would make the resumed run
# differ from the one its checkpoint belongs to, and is refused.
CHANGEABLE_ON_RESUME = ("name", "description", "output_dir", "training.iterations", "training.validation_interval",
                        "training.checkpoint_interval", "training.num_workers", "training.early_stopping",
                        "validation")


class ResumeError(AttnSegError, RuntimeError):
    """A run cannot be resumed as asked; the message says why."""


def distributed_context() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) for a single process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    apply_umask(tmp)
    os.replace(tmp, path)


def config_changes(saved, given, path: str = "") -> dict[str, list]:
    """Dotted key -> [saved value, given value] for every leaf that differs between two configs."""
    if isinstance(saved, dict) and isinstance(given, dict):
        changes = {}
        for key in sorted(set(saved) | set(given), key=str):
            changes.update(config_changes(saved.get(key), given.get(key), f"{path}.{key}" if path else str(key)))
        return changes
    return {} if saved == given else {path: [saved, given]}


def _same_json(a, b) -> bool:
    """Equal as JSON values (a tuple default equals the list a YAML config gives)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _changeable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in CHANGEABLE_ON_RESUME)


def _rng_state() -> dict:
    """Every RNG the training touches, as tensors and plain values (torch.load weights_only=True safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """Foreground Dice of two (D, H, W) label maps (MONAI ``compute_dice``; a class absent from both
    counts 1). Returns class name -> Dice for classes 1..C-1."""
    count = len(class_names)
    pred = torch.nn.functional.one_hot(torch.from_numpy(prediction.astype(np.int64)), count).movedim(-1, 0)[None]
    ref = torch.nn.functional.one_hot(torch.from_numpy(reference.astype(np.int64)), count).movedim(-1, 0)[None]
    dice = compute_dice(pred.float(), ref.float(), include_background=False, ignore_empty=False)[0]
    return {name: float(d) for name, d in zip(class_names[1:], dice)}


class Trainer:
    """Train ``config`` into ``output_dir`` (default: the config's ``output_dir``).

    ``resume``: continue from ``output_dir/checkpoints/last.*``. ``device``: auto | cpu | cuda | mps
    (under torchrun each process takes ``cuda:LOCAL_RANK``). ``progress``: show tqdm bars.
    """

    def __init__(self, config: dict, output_dir: str | os.PathLike | None = None, resume: bool = False,
                 device: str = "auto", progress: bool = True, strict: bool = False):
        self.config = config
        self.resume_changes: dict[str, list] = {}
        self.rank, self.world_size, local_rank = distributed_context()
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self.output = resolve_path(output_dir or config["output_dir"])
        self.checkpoints = self.output / "checkpoints"
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.device = (torch.device(f"cuda:{local_rank}") if self.world_size > 1 and torch.cuda.is_available()
                       else resolve_device(device))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._check_output(resume)

        seed = int(config["seed"])
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

        data = dict(config["data"])
        files = find_cases(data, resolve_path(data["root"]), strict)
        wrap = (lambda items: tqdm(items, desc="loading cases", leave=False)) if self.progress else None
        # Corrected cases: one unreadable case is left out (with a warning) unless strict.
        loaded = load_cases(files, data, wrap, skip_broken=data["layout"] == "corrected" and not strict)
        split_args = (self.output / "split.json", [c.name for c in loaded], data["validation_fraction"], seed)
        if self.world_size > 1:  # rank 0 writes the split; the others read it
            if self.is_main:
                load_or_make_split(*split_args)
            dist.barrier()
        self.split = load_or_make_split(*split_args)
        by_name = {c.name: c for c in loaded}
        self.train_cases = [by_name[n] for n in self.split["train"]]
        self.validation_cases = [by_name[n] for n in self.split["validation"]]
        self.class_names = [c["name"] for c in data["classes"]]

        model_cfg = config["model"]
        self.network = models.build(model_cfg["architecture"], in_channels=len(data["modalities"]),
                                    num_classes=len(self.class_names), **model_cfg["kwargs"]).to(self.device)
        bad = [s for s in config["patch_size"] if s % self.network.divisor]
        if bad:
            raise ValueError(f"patch_size {config['patch_size']} must be divisible by {self.network.divisor} "
                             f"for {model_cfg['architecture']} with these kwargs")
        self.parent: ModelPackage | None = None
        self.replay_cases: list[Case] = []
        self.reference_cases: list[Case] = []
        if model_cfg.get("init_from"):
            self._set_up_fine_tuning(files, resume, wrap)
        if model_cfg.get("warm_start") and not resume:
            self._warm_start()
        self.card = model_card(config, self.network, self.split)
        self.loss = build_loss(model_cfg["architecture"], config["loss"])
        self._build_optimizers()
        self.model = (DistributedDataParallel(self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                              find_unused_parameters=bool(config["training"].get("find_unused_parameters")))
                      if self.world_size > 1 else self.network)

        training = config["training"]
        self.amp_dtype = None
        if training["amp"] and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.iteration = 0
        self.history: dict = {"loss": [], "validation": []}
        self.loss_window: dict[str, list[float]] = {}  # loss parts since the last logged iteration
        self.best: dict = {"mean_dice": -1.0}
        self.stale_validations = 0
        if resume:
            self._load_checkpoint()
            if self.resume_changes:
                self.history.setdefault("config_changes", []).append(
                    {"iteration": self.iteration, "changes": self.resume_changes})
        if self.is_main and (not resume or self.resume_changes):
            (self.output / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    # -- set-up ----------------------------------------------------------------------------------
    def _check_output(self, resume: bool) -> None:
        last = self.checkpoints / "last.pt"
        if resume and not last.is_file():
            raise ResumeError(f"cannot resume: {last} does not exist (train without --resume first)")
        if not resume and last.is_file():
            raise ResumeError(f"{self.output} already holds a run; pass --resume to continue it or choose "
                              "another --output")
        if resume:
            saved = yaml.safe_load((self.output / "config.yaml").read_text())
            changes = config_changes(saved, self.config)
            refused = {k: v for k, v in changes.items() if not _changeable(k)}
            if refused:
                shown = "; ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in refused.items())
                raise ResumeError(f"cannot resume {self.output}: the config changed in {shown}; a resumed run "
                                  f"may change only {', '.join(CHANGEABLE_ON_RESUME)}: resume with the run's "
                                  "own config.yaml or start a new run")
            self.resume_changes = changes

    def _set_up_fine_tuning(self, files, resume: bool, wrap) -> None:
        """Start from the parent package (same architecture, network, modalities and classes, or an
        error that says which differs); load its replay and reference cases; freeze what is asked."""
        self.parent = parent = finetune.load_parent(self.config)
        model_cfg, data = self.config["model"], self.config["data"]
        theirs = parent.card
        same_network = theirs.architecture == model_cfg["architecture"] and _same_json(
            models.resolved_kwargs(theirs.architecture, **theirs.network_kwargs),
            models.resolved_kwargs(model_cfg["architecture"], **model_cfg["kwargs"]))
        differences = [what for what, same in (
            ("architecture or model kwargs (the network they build)", same_network),
            ("number of modalities", len(parent.modalities) == len(data["modalities"])),
            ("classes", [c["name"] for c in parent.classes] == self.class_names),
        ) if not same]
        if differences:
            raise ConfigError(f"model.init_from {parent.name}: its {', '.join(differences)} differ from this "
                              "config's; copy them from the package's model.json or train from scratch")
        if not resume:
            self.network.load_state_dict(parent.build_network().state_dict(), strict=True)
        tuning = finetune.settings(self.config)
        finetune.freeze(self.network, list(tuning["freeze"]))
        corrected = {c.name for c in self.train_cases + self.validation_cases}
        try:
            cases = finetune.parent_cases(parent, corrected, tuning["replay_cases"], tuning["reference_cases"],
                                          int(self.config["seed"]))
        except ConfigError:
            if tuning["replay_fraction"] > 0:
                raise
            cases = None
        if cases is not None:
            if tuning["replay_fraction"] > 0:
                self.replay_cases = load_cases(cases.replay, cases.data, wrap)
            self.reference_cases = load_cases(cases.reference, cases.data, wrap)
        if self.is_main and not resume:
            self.output.mkdir(parents=True, exist_ok=True)
            used = [f for f in files if f.name in corrected]
            finetune.write_lineage(self.output, finetune.make_lineage(
                self.config, parent, used, [c.name for c in self.replay_cases],
                [c.name for c in self.reference_cases]))

    def _warm_start(self) -> None:
        """Start from the weights of the package ``model.warm_start`` names (every parameter, same shapes;
        settings without parameters, such as a temperature, may differ) and record which in the run's
        ``warm_start.json`` (name, sha256 and, when its card has one, its training budget; copied into
        the exported card)."""
        try:
            package = load_weights_package(self.config, "warm_start")
        except PackageError as err:
            raise ConfigError(f"model.warm_start cannot be used: {err}; train and export the stage it names "
                              "first") from None
        try:
            self.network.load_state_dict(package.build_network().state_dict(), strict=True)
        except RuntimeError as err:
            raise ConfigError(f"model.warm_start {package.name}: its parameters do not fit this config's network "
                              f"({str(err).splitlines()[0]}); warm-start from a package of the same architecture "
                              "and kwargs") from None
        if self.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            record = {"name": package.name, "sha256": package.sha256}
            earlier = package.card.training_config
            if earlier is not None:  # the first stage's budget, for a reader of the card
                record["budget"] = {"iterations": earlier["training"]["iterations"],
                                    "batch_size": earlier["batch_size"]}
            (self.output / WARM_START_FILE).write_text(json.dumps(record) + "\n")

    def _build_optimizers(self) -> None:
        """One optimiser and scheduler, or two (segmenter, confidence network) for an alternating loss."""
        cfg = self.config
        total, per_epoch = cfg["training"]["iterations"], cfg["training"]["iterations_per_epoch"]
        if isinstance(self.loss, AlternatingLoss):
            confidence_net = getattr(self.network, "confidence_net", None)
            if confidence_net is None:
                raise ValueError(f"{cfg['model']['architecture']} has an alternating loss but no confidence_net")
            second = {id(p) for p in confidence_net.parameters()}
            groups = [[p for p in self.network.parameters() if id(p) not in second and p.requires_grad],
                      [p for p in confidence_net.parameters() if p.requires_grad]]
            settings = [(cfg["optimizer"], cfg["schedule"]),
                        ({**cfg["optimizer"], **cfg["optimizer"].get("confidence", {})},
                         {**cfg["schedule"], **cfg["schedule"].get("confidence", {})})]
        else:
            groups = [[p for p in self.network.parameters() if p.requires_grad]]
            settings = [(cfg["optimizer"], cfg["schedule"])]
        if not groups[0]:
            raise ConfigError("fine_tuning.freeze leaves no segmentation parameter to train")
        # A frozen confidence network (fine_tuning.freeze) has no optimiser and takes no step.
        self.trains_confidence = len(groups) > 1 and bool(groups[1])
        groups, settings = groups[:1 + self.trains_confidence], settings[:1 + self.trains_confidence]
        self.optimizers = [build_optimizer(g, o) for g, (o, _) in zip(groups, settings)]
        self.schedulers = [build_scheduler(opt, s, total, per_epoch) for opt, (_, s) in zip(self.optimizers, settings)]
        self.clip = cfg["optimizer"].get("grad_clip")

    # -- checkpoints ---------------------------------------------------------------------------------
    def _training_state(self) -> dict:
        states = [_rng_state()]
        if self.world_size > 1:
            states = [None] * self.world_size
            dist.all_gather_object(states, _rng_state())
        return {
            "iteration": self.iteration,
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict(),
            "rng": states,
            "history": self.history,
            "loss_window": self.loss_window,
            "best": self.best,
            "stale_validations": self.stale_validations,
        }

    def save_checkpoint(self) -> None:
        state = self._training_state()  # every rank joins the RNG gather
        if not self.is_main:
            return
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        _atomic_write(self.checkpoints / "last.safetensors", lambda p: save_file(weights, str(p)))
        _atomic_write(self.checkpoints / "last.pt", lambda p: torch.save(state, p))

    def _load_checkpoint(self) -> None:
        weights = load_file(str(self.checkpoints / "last.safetensors"), device=str(self.device))
        self.network.load_state_dict(weights, strict=True)
        state = torch.load(self.checkpoints / "last.pt", map_location="cpu", weights_only=True)
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"][self.rank if len(state["rng"]) > self.rank else 0])
        self.iteration = state["iteration"]
        self.history, self.best, self.loss_window = state["history"], state["best"], state.get("loss_window", {})
        self.stale_validations = state["stale_validations"]

    # -- one iteration -------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _no_sync(self, last: bool):
        """Skip DDP's gradient all-reduce on all but the last accumulated micro-batch."""
        return self.model.no_sync() if self.world_size > 1 and not last else contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor, scale: float) -> None:
        self.scaler.scale(loss * scale).backward()

    def _step(self, optimizer: torch.optim.Optimizer, parameters=None) -> None:
        if self.clip:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters or [p for g in optimizer.param_groups for p in g["params"]],
                                           float(self.clip))
        self.scaler.step(optimizer)

    def train_step(self, batches: list[dict]) -> dict[str, float]:
        """One iteration over ``accumulation`` micro-batches; returns the mean loss parts."""
        state = {"iteration": self.iteration, "epoch": self.iteration // self.config["training"]["iterations_per_epoch"]}
        scale = 1.0 / len(batches)
        sums: dict[str, float] = {}
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        outputs = []
        for k, batch in enumerate(batches):
            x = batch["image"].to(self.device, non_blocking=True)
            y = batch["label"].to(self.device, non_blocking=True)
            with self._no_sync(k == len(batches) - 1):
                with self._autocast():
                    output = self.model(x)
                    step_loss = self.loss.segmenter if isinstance(self.loss, AlternatingLoss) else self.loss
                    total, parts = step_loss(output, y, **state)
                self._backward(total, scale)
            outputs.append((SegOutput(output.logits.detach(), {}, {}), x, y))
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + float(value) * scale
            sums["loss"] = sums.get("loss", 0.0) + float(total.detach()) * scale
        self._step(self.optimizers[0])
        if isinstance(self.loss, AlternatingLoss) and self.trains_confidence:
            self._confidence_step(outputs, scale, state, sums)
        self.scaler.update()
        for scheduler in self.schedulers:
            scheduler.step()
        self.iteration += 1
        return sums

    def _confidence_step(self, outputs, scale: float, state: dict, sums: dict) -> None:
        """Second step of an alternating loss: the confidence network alone, on the segmenter's
        (detached) outputs for the same micro-batches. Under DDP its gradients are averaged across
        ranks with one all-reduce each (it runs outside the wrapped forward)."""
        optimizer = self.optimizers[1]
        optimizer.zero_grad(set_to_none=True)
        for output, x, y in outputs:
            with self._autocast():
                total, parts = self.loss.confidence(output, y, model=self.network, image=x, **state)
            self._backward(total, scale)
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + float(value) * scale
        parameters = list(self.network.confidence_net.parameters())
        if self.world_size > 1:
            for p in parameters:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world_size
        self._step(optimizer, parameters)

    # -- validation ----------------------------------------------------------------------------------
    def _mean_dice(self, cases: list[Case], desc: str) -> dict:
        """Mean foreground Dice of the network on ``cases`` (the product's Predictor): ``{"mean_dice",
        "dice": class -> Dice, "cases"}``."""
        # No out-of-memory fallback: validation never moves the network being trained (a CPU fallback
        # would) nor validates with other settings than the card's; it fails with one clear line instead.
        predictor = Predictor(self.network, card=self.card, device=str(self.device), with_maps=False, fallback=False)
        per_case = {}
        try:
            for case in tqdm(cases, desc=desc, leave=False, disable=not self.progress):
                probabilities, _ = predictor.predict_array(case.image)
                per_case[case.name] = dice_per_class(probabilities.argmax(0), case.label, self.class_names)
        finally:
            self.network.train()
        dice = {name: float(np.mean([d[name] for d in per_case.values()])) for name in self.class_names[1:]}
        return {"mean_dice": float(np.mean(list(dice.values()))), "dice": dice, "cases": len(per_case)}

    def validate(self) -> dict:
        """Mean foreground Dice on the validation cases and, when fine-tuning, on the parent's reference
        cases (``"reference"``), predicted by the product's Predictor."""
        limit = self.config["validation"].get("max_cases")
        cases = self.validation_cases[:limit] if limit else self.validation_cases
        result = {"iteration": self.iteration, **self._mean_dice(cases, "validation")}
        if self.reference_cases:
            result["reference"] = self._mean_dice(self.reference_cases, "reference")
        return result

    def _keeps_reference(self, result: dict) -> bool:
        """Fine-tuning: the reference Dice is within ``reference_tolerance`` of the starting weights'."""
        start = self.history["validation"][0].get("reference") if self.history["validation"] else None
        if "reference" not in result or start is None:
            return True
        tolerance = float(finetune.settings(self.config)["reference_tolerance"])
        return result["reference"]["mean_dice"] >= start["mean_dice"] - tolerance

    def _after_validation(self, result: dict) -> bool:
        """Record a validation; keep the best weights (when fine-tuning, only those that keep the
        reference Dice); True when early stopping says stop."""
        self.history["validation"].append(result)
        stopping = self.config["training"]["early_stopping"]
        gain = result["mean_dice"] > self.best["mean_dice"] + float(stopping.get("min_delta") or 0.0)
        if gain and self._keeps_reference(result):
            self.best = result
            self.stale_validations = 0
            if self.is_main:
                self.checkpoints.mkdir(parents=True, exist_ok=True)
                weights = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
                _atomic_write(self.checkpoints / "best.safetensors", lambda p: save_file(weights, str(p)))
                (self.output / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
        else:
            self.stale_validations += 1
        patience = stopping.get("patience")
        return bool(patience) and self.stale_validations >= int(patience)

    # -- the loop ------------------------------------------------------------------------------------
    def _loader(self, stop: int) -> DataLoader:
        cfg = self.config
        accumulation = cfg["training"]["accumulation"]
        tuning = finetune.settings(cfg)
        weights = finetune.case_weights(len(self.train_cases), len(self.replay_cases), tuning["replay_fraction"])
        dataset = PatchDataset(self.train_cases + self.replay_cases, cfg["patch_size"], len(self.class_names),
                               cfg["sampling"], cfg["augmentation"], cfg["seed"], case_weights=weights,
                               changed_ratio=tuning["changed_voxel_ratio"] if self.parent else 0.0)
        batches = IterationBatches(self.iteration * accumulation, stop * accumulation, cfg["batch_size"],
                                   self.rank, self.world_size)
        workers = int(cfg["training"]["num_workers"])
        return DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=workers > 0)

    def fit(self, stop_at: int | None = None) -> dict:
        """Train until ``training.iterations`` (or ``stop_at``, as if interrupted there), validating
        every ``validation_interval``; returns the best validation result."""
        training = self.config["training"]
        total = training["iterations"]
        stop = min(stop_at, total) if stop_at is not None else total
        accumulation = training["accumulation"]
        writer = None
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(self.output / "tensorboard"), purge_step=self.iteration or None)
        self.network.train()
        if self.parent is not None and self.iteration == 0 and not self.history["validation"]:
            self._validate_and_log(writer)  # the starting (parent's) weights: what fine-tuning must beat
        loader = iter(self._loader(stop))
        bar = tqdm(total=total, initial=self.iteration, desc=self.config["name"], disable=not self.progress,
                   dynamic_ncols=True)
        started = time.perf_counter()
        should_stop, saved_at = False, self.iteration
        while self.iteration < stop and not should_stop:
            parts = self.train_step([next(loader) for _ in range(accumulation)])
            for name, value in parts.items():
                self.loss_window.setdefault(name, []).append(value)
            bar.update(1)
            if self.iteration % LOG_EVERY == 0 or self.iteration == total:
                means = {name: float(np.mean(v)) for name, v in self.loss_window.items()}
                self.loss_window = {}
                self.history["loss"].append([self.iteration, means["loss"]])
                if writer is not None:
                    for name, value in means.items():
                        writer.add_scalar(f"loss/{name}", value, self.iteration)
                    for k, scheduler in enumerate(self.schedulers):
                        writer.add_scalar(f"lr/{k}", scheduler.get_last_lr()[0], self.iteration)
                bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{self.schedulers[0].get_last_lr()[0]:.2e}",
                                best=f"{max(self.best['mean_dice'], 0):.4f}")
            checkpoint_every = training.get("checkpoint_interval")
            if self.iteration % training["validation_interval"] == 0 or self.iteration == total:
                should_stop = self._validate_and_log(writer)
                self.save_checkpoint()
                saved_at = self.iteration
                self._plot()
            elif checkpoint_every and self.iteration % checkpoint_every == 0:
                self.save_checkpoint()
                saved_at = self.iteration
        bar.close()
        if saved_at != self.iteration:
            self.save_checkpoint()  # stopped between validations (stop_at): keep the state to resume from
        if writer is not None:
            writer.add_scalar("time/train_seconds", time.perf_counter() - started, self.iteration)
            writer.close()
        if should_stop and self.is_main:
            tqdm.write(f"early stopping at iteration {self.iteration}: no gain in validation Dice for "
                       f"{self.stale_validations} validations (best {self.best['mean_dice']:.4f} "
                       f"at iteration {self.best['iteration']})")
        return self.best

    def _validate_and_log(self, writer) -> bool:
        """Rank 0 validates; every rank learns whether to stop."""
        stop = False
        if self.is_main:
            result = self.validate()
            stop = self._after_validation(result)
            writer.add_scalar("validation/mean_dice", result["mean_dice"], self.iteration)
            for name, value in result["dice"].items():
                writer.add_scalar(f"validation/dice_{name}", value, self.iteration)
            reference = result.get("reference")
            if reference is not None:
                writer.add_scalar("reference/mean_dice", reference["mean_dice"], self.iteration)
            tqdm.write(f"iteration {self.iteration}: validation mean Dice {result['mean_dice']:.4f} "
                       + " ".join(f"{k} {v:.4f}" for k, v in result["dice"].items())
                       + (f"; reference ({reference['cases']} cases of {self.parent.name}) mean Dice "
                          f"{reference['mean_dice']:.4f}" if reference is not None else ""))
        if self.world_size > 1:
            flag = [stop]
            dist.broadcast_object_list(flag, src=0)
            stop = flag[0]
        return stop

    def _plot(self) -> None:
        if self.is_main:
            plot_curves(self.history, self.output / "curves.png", title=self.config["name"])
