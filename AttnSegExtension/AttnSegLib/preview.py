"""A quick-look PNG of a result: for the slice through the most doubtful region, the image with the
segmentation outlined, and each map as a colour overlay with its scale.

Used by ``attnseg segment --preview`` (batch quality control) and for the README's pictures.
Needs matplotlib (``pip install attnseg[train]``); the engine does not import this module.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .image import Image


def _slice_index(result, axis: int) -> int:
    """The slice (numpy axis ``axis``) with the most foreground, else the middle one."""
    labels = result.labels.array
    counts = (labels > 0).sum(axis=tuple(a for a in range(3) if a != axis))
    return int(np.argmax(counts)) if counts.any() else labels.shape[axis] // 2


def _display(array: np.ndarray, geometry) -> tuple[np.ndarray, float]:
    """An axial (D, H, W)[k] slice oriented for display, and its pixel aspect ratio."""
    return np.flipud(array), geometry.spacing[1] / geometry.spacing[0]


def render_preview(image: Image, result, path: str | Path, map_names: list[str] | None = None,
                   class_colors: list[tuple[int, int, int]] | None = None, title: str = "") -> Path:
    """Write a PNG: image + label outlines, then one panel per map (default: every map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    map_names = map_names if map_names is not None else list(result.maps)
    k = _slice_index(result, 0)
    base, aspect = _display(image.array[k].astype(np.float32), image.geometry)
    labels, _ = _display(result.labels.array[k], image.geometry)
    lo, hi = np.percentile(base, [1, 99.5])
    panels = 1 + len(map_names)
    fig, axes = plt.subplots(1, panels, figsize=(2.6 * panels, 3.0), dpi=110, squeeze=False)
    colors = class_colors or [(0, 0, 0), (230, 80, 60), (60, 140, 230), (80, 200, 120), (240, 200, 60)]
    for ax in axes[0]:
        ax.imshow(base, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        for value in range(1, int(labels.max()) + 1):
            if (labels == value).any():
                ax.contour(labels == value, levels=[0.5], colors=[np.asarray(colors[value % len(colors)]) / 255],
                           linewidths=1.0)
        ax.set_axis_off()
    axes[0][0].set_title("segmentation", fontsize=8)
    for ax, name in zip(axes[0][1:], map_names):
        values, _ = _display(result.maps[name].array[k], image.geometry)
        shown = ax.imshow(np.ma.masked_less(values, 0.02), cmap="inferno", vmin=0, vmax=max(1e-6, float(values.max())),
                          alpha=0.75, aspect=aspect, interpolation="bilinear")
        ax.set_title(name, fontsize=8)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
