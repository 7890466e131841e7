"""Optimisers and learning-rate schedules from a config.

A schedule is a factor on the base learning rate as a pure function of the iteration, run by
``torch.optim.lr_scheduler.LambdaLR`` (one step per iteration), so resuming restores it exactly.

Schedules (``schedule.name``), with ``t`` the iteration, ``T`` the total and ``e = t / iterations_per_epoch``:

* ``constant``: 1
* ``poly``: (1 - t / T) ** power                                    (nnU-Net: power 0.9)
* ``cosine``: min_factor + (1 - min_factor) (1 + cos(pi t / T)) / 2
* ``step``: gamma ** floor(e / step_epochs)                           (difficulty-aware: 0.5 every 3 epochs)
* ``warm_restarts``: gamma ** floor((e mod period_epochs) / step_epochs)  (DAM-AL: periods of 200 epochs,
  divided by 10 every 40, the rate restarting at its maximum every period)

``warmup_iterations`` > 0 ramps any of them linearly from 0 over the first iterations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("constant", "poly", "cosine", "step", "warm_restarts")
OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class LearningRateFactor:
    """Callable ``iteration -> factor`` for ``LambdaLR``; see the module docstring."""

    name: str
    total: int
    iterations_per_epoch: int
    power: float = 0.9
    min_factor: float = 0.0
    gamma: float = 0.1
    step_epochs: float = 1.0
    period_epochs: float = 1.0
    warmup_iterations: int = 0

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; choose one of {', '.join(SCHEDULES)}")

    def __call__(self, iteration: int) -> float:
        t = min(iteration, self.total)
        epoch = iteration / self.iterations_per_epoch
        if self.name == "constant":
            factor = 1.0
        elif self.name == "poly":
            factor = (1.0 - t / self.total) ** self.power
        elif self.name == "cosine":
            factor = self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t / self.total))
        elif self.name == "step":
            factor = self.gamma ** math.floor(epoch / self.step_epochs)
        else:
            factor = self.gamma ** math.floor((epoch % self.period_epochs) / self.step_epochs)
        if iteration < self.warmup_iterations:
            factor *= (iteration + 1) / self.warmup_iterations
        return factor


def build_optimizer(parameters, settings: dict) -> torch.optim.Optimizer:
    """``settings``: name (adam | adamw | sgd), lr, weight_decay, and for SGD momentum, nesterov."""
    name, lr, decay = settings["name"], float(settings["lr"]), float(settings.get("weight_decay", 0.0))
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, weight_decay=decay, momentum=float(settings.get("momentum", 0.9)),
                               nesterov=bool(settings.get("nesterov", False)))
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def build_scheduler(optimizer: torch.optim.Optimizer, settings: dict, total: int,
                    iterations_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    keys = ("power", "min_factor", "gamma", "step_epochs", "period_epochs", "warmup_iterations")
    factor = LearningRateFactor(settings["name"], total, iterations_per_epoch,
                                **{k: settings[k] for k in keys if k in settings})
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
