"""A quick-look PNG of a result: for the slice through the most doubtful region, the image with the
segmentation outlined, and each map as a colour overlay with its scale.

Used by ``attnseg segment --preview`` (batch quality control) and for the README's pictures.
Needs matplotlib (``pip install attnseg[train]``); the engine does not import this module.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .card import ModelCard
from .image import Image
from .outputs import display_range, hidden


def _slice_index(result, axis: int) -> int:
    """The slice (numpy axis ``axis``) with the most foreground, else the middle one."""
    labels = result.labels.array
    counts = (labels > 0).sum(axis=tuple(a for a in range(3) if a != axis))
    return int(np.argmax(counts)) if counts.any() else labels.shape[axis] // 2


def plane_name(geometry) -> str:
    """The anatomical plane of a slice at fixed k (numpy axis 0): the one whose normal is nearest the
    image's k axis (axial for S, coronal for A-P, sagittal for L-R)."""
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(geometry.direction_matrix[:, 2])))]


def _display(array: np.ndarray, geometry) -> tuple[np.ndarray, float]:
    """An axial (D, H, W)[k] slice oriented for display, and its pixel aspect ratio."""
    return np.flipud(array), geometry.spacing[1] / geometry.spacing[0]


def draw_map(ax, values: np.ndarray, shown_range: tuple[float, float], colormap, **imshow_kwargs):
    """Draw a (H, W) map slice on ``ax`` as Slicer's slice views draw it: ``colormap`` from the first to
    the last value of ``shown_range`` (reversed for a range that runs high to low), nothing where
    :func:`~AttnSegLib.outputs.hidden`. Returns the drawn image, for a colour bar."""
    first, last = shown_range
    return ax.imshow(np.ma.masked_where(hidden(values, shown_range), values),
                     cmap=colormap.reversed() if first > last else colormap, vmin=min(first, last),
                     vmax=max(first, last), **imshow_kwargs)


def render_preview(image: Image, result, path: str | Path, map_names: list[str] | None = None,
                   class_colors: list[tuple[int, int, int]] | None = None, title: str = "",
                   class_names: list[str] | None = None, card: ModelCard | None = None) -> Path:
    """Write a PNG: image + label outlines, then one panel per map (default: every map). The first
    panel names its plane and slice, and a legend names each class drawn by its colour
    (``class_names`` per label value, background first; default ``class <value>``). Each map is drawn
    on its display range (:func:`~AttnSegLib.outputs.display_range`, from ``card`` where it gives one)
    as Slicer and the web app draw it (:func:`draw_map`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inferno = matplotlib.colormaps["inferno"]
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
    depth = result.labels.array.shape[0]
    axes[0][0].set_title(f"segmentation · {plane_name(image.geometry)} slice {k + 1} of {depth}", fontsize=8)
    drawn = [v for v in range(1, int(labels.max()) + 1) if (labels == v).any()]
    _class_legend(axes[0][0], [(class_names[v] if class_names and v < len(class_names) else f"class {v}",
                                np.asarray(colors[v % len(colors)]) / 255) for v in drawn])
    for ax, name in zip(axes[0][1:], map_names):
        values, _ = _display(result.maps[name].array[k], image.geometry)
        shown = draw_map(ax, values, display_range(name, result.maps[name].array, card, len(result.classes)),
                         inferno, alpha=0.75, aspect=aspect, interpolation="bilinear")
        ax.set_title(name, fontsize=8)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    return _save(fig, path, title, 9)


def render_whole_head_preview(image: Image, result, path: str | Path, title: str = "") -> Path:
    """Write a PNG for a localised result (classes with a ``side``): per side, coronal, sagittal and
    axial slices through the segmented structure, zoomed to 80 mm around it, with every class
    outlined in its colour; then a whole axial slice through both, labelled R and L as seen, with a
    legend of the classes by colour.

    Slices are taken on the input grid after reorienting it to RAS for display (radiological
    convention: the patient's right on the left of the picture, anterior up in the axial view).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    def to_ras(array: np.ndarray) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.DICOMOrient(Image(array, image.geometry).to_sitk(), "LPS"))

    volume, labels = to_ras(image.array.astype(np.float32)), to_ras(result.labels.array)  # (S, P, L) axes: z, y, x
    spacing = sitk.DICOMOrient(image.to_sitk(), "LPS").GetSpacing()  # x (to L), y (to P), z (to S)
    lo, hi = np.percentile(volume[volume > volume.min()] if (volume > volume.min()).any() else volume, [1, 99.5])
    colors = {c["value"]: np.asarray(c.get("color", (255, 255, 0))[:3]) / 255 for c in result.classes}
    sides = sorted({c["side"] for c in result.classes if "side" in c}, key=lambda s: s != "Right")
    fig, axes = plt.subplots(1, 3 * len(sides) + 1, figsize=(2.6 * (3 * len(sides) + 1), 3.2), dpi=110, squeeze=False)
    panels = iter(axes[0])

    def show(ax, img, lab, aspect, caption, left_right=None):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        for value in np.unique(lab):
            if value > 0:
                ax.contour(lab == value, levels=[0.5], colors=[colors[int(value)]], linewidths=1.0)
        if left_right:
            for x, text in zip((0.03, 0.97), left_right):
                ax.text(x, 0.5, text, color="w", fontsize=8, transform=ax.transAxes, ha="center", va="center")
        ax.set_title(caption, fontsize=7)
        ax.set_axis_off()

    half = [int(round(40 / s)) for s in spacing]
    for side in sides:
        values = [c["value"] for c in result.classes if c.get("side") == side]
        z, y, x = (np.nonzero(np.isin(labels, values)) if np.isin(labels, values).any()
                   else [np.array([n // 2]) for n in labels.shape])
        cz, cy, cx = int(np.median(z)), int(np.median(y)), int(np.median(x))
        zs = slice(max(cz - half[2], 0), cz + half[2])
        ys = slice(max(cy - half[1], 0), cy + half[1])
        xs = slice(max(cx - half[0], 0), cx + half[0])
        # coronal: rows S->I (flip z), columns x toward L (R on the left: radiological)
        show(next(panels), np.flipud(volume[zs, cy, xs]), np.flipud(labels[zs, cy, xs]), spacing[2] / spacing[0],
             f"{side}: coronal", ("R", "L"))
        # sagittal: rows S->I, columns anterior on the left (y grows to P)
        show(next(panels), np.flipud(volume[zs, ys, cx]), np.flipud(labels[zs, ys, cx]), spacing[2] / spacing[1],
             f"{side}: sagittal", ("A", "P"))
        show(next(panels), volume[cz, ys, xs], labels[cz, ys, xs], spacing[1] / spacing[0], f"{side}: axial",
             ("R", "L"))
    k = int(np.median(np.nonzero(labels)[0])) if labels.any() else labels.shape[0] // 2
    whole = next(panels)
    show(whole, volume[k], labels[k], spacing[1] / spacing[0], "axial, whole head", ("R", "L"))
    # Both sides share a colour per part: one legend entry per colour, named without the side.
    entries: dict[tuple, str] = {}
    for c in result.classes[1:]:
        name = c["name"][len(c["side"]) + 1:] if "side" in c and c["name"].startswith(c["side"] + " ") else c["name"]
        entries.setdefault(tuple(colors[c["value"]]), name)
    _class_legend(whole, [(name, np.asarray(color)) for color, name in entries.items()], columns=1)
    return _save(fig, path, title, 8)


def _class_legend(ax, entries: list[tuple[str, np.ndarray]], columns: int | None = None) -> None:
    """A legend along the bottom of ``ax``: one line swatch per ``(class name, RGB in [0, 1])``, in
    ``columns`` columns (default: all on one row)."""
    if not entries:
        return
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=color, linewidth=2, label=name) for name, color in entries]
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, -0.02), ncol=columns or len(handles),
              fontsize=6, frameon=False, labelcolor="white", handlelength=1.2)


def _save(fig, path, title: str | None, title_size: int) -> Path:
    """Title, lay out, write ``fig`` to ``path`` (its folder made) and close it."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=title_size)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
