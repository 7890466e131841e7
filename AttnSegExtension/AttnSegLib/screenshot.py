"""A picture of a segmentation under review, drawn from the MRML nodes :class:`SceneLogic` made:
axial, coronal and sagittal slices through the most doubtful region, each with the segment outlines and
one map as a coloured overlay, and the map's colour bar. For the README and the extension's screenshot.

Needs matplotlib (``pip install attnseg[train]``)::

    python -m AttnSegLib.screenshot --image Resources/SampleData/hippocampus_001_image.nii.gz \\
        --output Resources/Screenshots/AttnSeg_review.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .image import Image
from .mrml import colorScale, imageFromVolumeNode, newScene
from .preview import draw_map
from .slicer_logic import SceneLogic

# DICOMOrient to this code puts voxel axes i, j, k along patient left, posterior, superior.
_DISPLAY_ORIENTATION = "LPS"


def _for_display(image: Image) -> sitk.Image:
    """The image with its voxel axes permuted and flipped to run to patient left, posterior and superior
    (an oblique volume is shown in its nearest such orientation)."""
    return sitk.DICOMOrient(image.to_sitk(), _DISPLAY_ORIENTATION)


def _views(volume: np.ndarray, index_kji) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices through ``index_kji``, rows top to bottom as on screen."""
    k, j, i = index_kji
    return [volume[k], np.flipud(volume[:, j, :]), np.flipud(volume[:, :, i])]


def render_review(logic: SceneLogic, segmentation_node, path: str | Path, map_name: str | None = None,
                  opacity: float = 0.55, threshold: float = 0.3, title: str = "",
                  centre_ras: tuple[float, float, float] | None = None, dpi: int = 120) -> Path:
    """Write a PNG of ``segmentation_node`` with ``map_name`` (default: the review map) over its
    first input, through ``centre_ras`` (RAS mm) when given, else through the marker of the most
    doubtful region at ``threshold`` (else the centre)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    maps = logic.mapNodes(segmentation_node)
    review_map = logic.reviewMapName(segmentation_node)  # the map the doubtful regions are measured on
    map_name = map_name or review_map
    legend = logic.mapLegend(maps[map_name])
    grid = _for_display(imageFromVolumeNode(logic.inputNodes(segmentation_node)[0]))
    image, spacing = sitk.GetArrayFromImage(grid), grid.GetSpacing()
    labels = sitk.GetArrayFromImage(_for_display(logic.correctedLabels(segmentation_node)))
    overlay = sitk.GetArrayFromImage(_for_display(imageFromVolumeNode(maps[map_name])))

    regions = logic.doubtfulRegions(segmentation_node, threshold) if centre_ras is None else []
    if regions:
        centre_ras = regions[0].marker_ras
    if centre_ras is None:
        centre = tuple(n // 2 for n in image.shape)
    else:
        r, a, s = centre_ras
        i, j, k = grid.TransformPhysicalPointToIndex((-r, -a, s))
        centre = tuple(int(np.clip(v, 0, n - 1)) for v, n in zip((k, j, i), image.shape))

    segmentation = segmentation_node.GetSegmentation()
    colors = {segmentation.GetNthSegment(n).GetName(): segmentation.GetNthSegment(n).GetColor()
              for n in range(segmentation.GetNumberOfSegments())}
    classes = json.loads(segmentation_node.GetAttribute("AttnSeg.Classes"))[1:]

    low, high = np.percentile(image, [1, 99.5])
    colormap = ListedColormap(colorScale(256))
    aspects = [spacing[1] / spacing[0], spacing[2] / spacing[0], spacing[2] / spacing[1]]
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.9), dpi=dpi, facecolor="black")
    for ax, grey, label, heat, aspect, name in zip(axes, _views(image, centre), _views(labels, centre),
                                                    _views(overlay, centre), aspects,
                                                    ("axial", "coronal", "sagittal")):
        ax.imshow(grey, cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="bilinear")
        shown = draw_map(ax, heat, (legend.first, legend.last), colormap, alpha=opacity, aspect=aspect,
                         interpolation="bilinear")
        for cls in classes:
            mask = label == cls["value"]
            if mask.any() and not mask.all():
                ax.contour(mask, levels=[0.5], colors=[colors.get(cls["name"], (1, 1, 0))], linewidths=1.4)
        ax.set_title(name, color="white", fontsize=9)
        ax.set_axis_off()
    bar = fig.colorbar(shown, ax=axes, fraction=0.025, pad=0.02)
    bar.set_label(map_name, color="white", fontsize=9)
    bar.ax.tick_params(colors="white", labelsize=7)
    model = segmentation_node.GetAttribute("AttnSeg.Model")
    caption = title or f"{model}: outlines = segments, colour = {map_name}"
    if regions:
        caption += (f"; centred on the most doubtful of {len(regions)} regions ({regions[0].volume_ml:.2f} ml, "
                    f"mean {review_map} {regions[0].mean_value:.2f})")
    fig.suptitle(caption, color="white", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, facecolor="black")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", nargs="+", required=True, help="one image per modality of the model")
    parser.add_argument("--model", default=None, help="package name or path (default: the default package)")
    parser.add_argument("--map", default=None, help="map to overlay (default: the review map)")
    parser.add_argument("--output", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    logic = SceneLogic(newScene())
    volumes = [logic.loadVolume(p) for p in args.image]
    result = logic.segment(volumes, args.model, device="cpu")
    return render_review(logic, result.segmentationNode, args.output, args.map)


if __name__ == "__main__":
    print(main())
