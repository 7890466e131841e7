"""Figures of a run, drawn with matplotlib's Agg backend (no display needed).

* :func:`plot_curves`: the training loss per logged iteration and the validation Dice per class, from
  the trainer's history ``{"loss": [[iteration, value], ...], "validation": [{"iteration",
  "mean_dice", "dice": {class: value}}]}``;
* :func:`box_plot`: per-class distributions of evaluation metrics across cases.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_curves(history: dict, path: Path, title: str = "") -> Path:
    """Write the loss (left) and validation Dice (right) curves to ``path``; returns it."""
    fig, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    if history["loss"]:
        iterations, values = zip(*history["loss"])
        loss_ax.plot(iterations, values, color="tab:blue", linewidth=1)
    loss_ax.set(xlabel="iteration", ylabel="training loss", title="loss")
    loss_ax.grid(alpha=0.3)
    validation = history["validation"]
    if validation:
        iterations = [v["iteration"] for v in validation]
        for name in validation[0]["dice"]:
            dice_ax.plot(iterations, [v["dice"][name] for v in validation], marker=".", linewidth=1, label=name)
        dice_ax.plot(iterations, [v["mean_dice"] for v in validation], color="black", linewidth=2,
                     label="mean foreground")
        dice_ax.legend(loc="lower right")
    dice_ax.set(xlabel="iteration", ylabel="Dice", title="validation Dice", ylim=(0, 1))
    dice_ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def box_plot(per_case: dict[str, dict[str, dict]], metrics: dict[str, str], path: Path, title: str = "") -> Path:
    """One panel per metric (``metrics``: key -> panel title), one box per class across cases.

    ``per_case``: case -> class name -> {metric key: value or None}; None values are left out.
    """
    class_names = list(next(iter(per_case.values())))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4), constrained_layout=True, squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics.items()):
        columns = [[m[n][key] for m in per_case.values() if m[n][key] is not None] for n in class_names]
        ax.boxplot(columns, showmeans=True)
        ax.set_xticks(range(1, len(class_names) + 1), class_names)
        ax.set(title=label)
        ax.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
