"""Figures of a run, drawn with matplotlib's Agg backend (no display needed).

* :func:`plot_curves`: the training loss per logged iteration and the validation Dice per class, from
  the trainer's history ``{"loss": [[iteration, value], ...], "validation": [{"iteration",
  "mean_dice", "dice": {class: value}}]}``;
* :func:`box_plot`: per-class distributions of evaluation metrics across cases;
* :func:`reliability_diagram` and :func:`effort_plot`: calibration and review effort of doubt maps.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def _save(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` (its folder made as needed) at 100 dpi, close it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
    return _save(fig, path)


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
    return _save(fig, path)


def reliability_diagram(bins: dict, path: Path, title: str = "") -> Path:
    """Reliability diagram of foreground probabilities: label -> (3, B) calibration bins
    (``AttnSegLib.metrics.calibration_bins``: count, sum of probabilities, sum of outcomes), one line
    each of observed frequency against mean probability per filled bin, the diagonal being calibrated;
    below, the share of the pairs in each bin (log scale). Writes ``path``; returns it."""
    from AttnSegLib.metrics import expected_calibration_error

    fig, (curve_ax, count_ax) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, height_ratios=(3, 1),
                                             constrained_layout=True)
    curve_ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    for label, b in bins.items():
        count, confidence, outcome = b
        filled = count > 0
        curve_ax.plot(confidence[filled] / count[filled], outcome[filled] / count[filled], marker="o", linewidth=1,
                      label=f"{label} (ECE {expected_calibration_error(b):.4f})")
        count_ax.step([i / len(count) for i in range(len(count) + 1)], [*(count / count.sum()), 0],
                      where="post", label=label)
    curve_ax.set(ylabel="observed frequency", title=title or "reliability (foreground classes)",
                 xlim=(0, 1), ylim=(0, 1))
    curve_ax.legend(loc="upper left", fontsize=8)
    curve_ax.grid(alpha=0.3)
    count_ax.set(xlabel="predicted probability", ylabel="share of pairs", yscale="log")
    count_ax.grid(alpha=0.3)
    return _save(fig, path)


def effort_plot(fractions, curves: dict, path: Path, title: str = "", budget: float | None = None,
                share: float | None = None) -> Path:
    """Review effort: label -> (K,) share of the wrong voxels found against ``fractions`` (K,), the
    share of the volume reviewed, as percentages (the boundary-distance baseline dotted); ``budget``
    and ``share`` draw the target lines.
    Writes ``path``; returns it."""
    fig, ax = plt.subplots(figsize=(6, 4.5), constrained_layout=True)
    percent = [100 * f for f in fractions]
    for label, curve in curves.items():
        ax.plot(percent, [100 * v for v in curve], linewidth=1.5, label=label,
                linestyle=":" if label.startswith("boundary distance") else "-")
    if budget is not None:
        ax.axvline(100 * budget, color="grey", linewidth=1, linestyle="--")
    if share is not None:
        ax.axhline(100 * share, color="grey", linewidth=1, linestyle="--")
    ax.set(xlabel="volume reviewed (% of the image, most doubtful first)", ylabel="wrong voxels found (%)",
           title=title or "review effort", xlim=(0, percent[-1]), ylim=(0, 100))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
