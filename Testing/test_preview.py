"""``preview.png`` (``attnseg segment --preview``): the shipped default model on the shipped sample,
drawn with its plane named and a legend of the classes in their colours."""
from __future__ import annotations

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
