"""``preview.png`` (``attnseg segment --preview``): the shipped default model on the shipped sample,
drawn with its plane named and a legend of the classes in their colours."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from AttnSegLib.image import read_image
from AttnSegLib.inference import Predictor
from AttnSegLib.package import PackageError, default_package

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "Resources" / "SampleData" / "hippocampus_001_image.nii.gz"


def test_preview_has_a_class_legend_in_the_class_colours(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image as PILImage

    from AttnSegLib.preview import render_preview

    try:
        package = default_package()
    except PackageError:
        pytest.skip("no shipped default package")
    image = read_image(SAMPLE)
    result = Predictor(package, device="cpu").predict([image])
    colors = [tuple(c["color"]) for c in package.classes]
    path = render_preview(image, result, tmp_path / "preview.png", map_names=[], class_colors=colors,
                          class_names=[c["name"] for c in package.classes])
    pixels = np.asarray(PILImage.open(path).convert("RGB")).astype(int)
    # The legend is drawn along the bottom of the panel, below the structure's outlines.
    bottom = pixels[int(0.85 * pixels.shape[0]):]
    for color in colors[1:]:
        assert (np.abs(bottom - np.array(color)).max(axis=-1) <= 30).sum() >= 10, f"no legend entry in {color}"


def test_whole_head_preview_has_a_class_legend_in_the_class_colours(data_dir, tmp_path):
    """The whole-head picture (both hippocampi, sides sharing a colour per part) carries the same legend:
    one swatch per part colour under the whole axial slice."""
    pytest.importorskip("matplotlib")
    from PIL import Image as PILImage

    from AttnSegLib.cli import main

    out = tmp_path / "out"
    assert main(["segment", "-i", str(data_dir / "mni152" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
                 "-o", str(out), "--device", "cpu", "--no-maps", "--preview"]) == 0
    colors = {tuple(c["color"]) for c in json.loads((out / "report.json").read_text())["classes"][1:]}
    pixels = np.asarray(PILImage.open(out / "preview.png").convert("RGB")).astype(int)
    # The last panel is the whole axial slice; its legend lies below the hippocampi's outlines.
    corner = pixels[int(0.8 * pixels.shape[0]):, int(0.86 * pixels.shape[1]):]
    for color in colors:
        assert (np.abs(corner - np.array(color)).max(axis=-1) <= 30).sum() >= 10, f"no legend entry in {color}"


def test_the_plane_is_named_from_the_images_direction():
    """The sample's slices (k along S) are axial; the same voxels stored with k along L-R or A-P are
    sagittal or coronal slices."""
    import SimpleITK as sitk

    from AttnSegLib.image import Image
    from AttnSegLib.preview import plane_name

    sample = read_image(SAMPLE)
    assert plane_name(sample.geometry) == "axial"
    for order, plane in (((1, 2, 0), "sagittal"), ((0, 2, 1), "coronal")):  # the new k: old i, old j
        moved = Image.from_sitk(sitk.PermuteAxes(sample.to_sitk(), order))
        assert plane_name(moved.geometry) == plane
