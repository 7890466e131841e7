"""A picture of every shipped model map on a held-out hippocampus crop, and the README section showing them.

    python -m training.map_pictures [--models Resources/Models] [--readme README.md]

Every package in ``--models`` whose card describes maps of its own segments the shipped sample
(``Resources/SampleData/hippocampus_001``, a validation case of every hippocampus package: the script
refuses a package that trained on it) through the product path, :class:`AttnSegLib.slicer_logic.SceneLogic`
on a slicer-core MRML scene as the Slicer panel does. Each of its map volumes is drawn over the T1
(:func:`AttnSegLib.screenshot.render_review`) on the display range the card gives it, through the centre
of the reference hippocampus, with the model's segment outlines, into ``Resources/Screenshots/maps/``.

The README's block between ``BEGIN`` and ``END`` is then rewritten: per map volume its picture, its unit
and display range, and what the card measured of it on the hippocampus
(:func:`AttnSegLib.outputs.information_note`, the sentence the panel and the page show beside the map).
Nothing here measures: rerun it after a package is retrained (and its card re-measured with
``training.map_display``) and the pictures and figures follow.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from AttnSegLib.card import UNCERTAINTY
from AttnSegLib.image import read_image
from AttnSegLib.mrml import newScene
from AttnSegLib.outputs import PROBABILITY_PREFIX, information_note, map_title
from AttnSegLib.package import PackageError, load_package
from AttnSegLib.screenshot import render_review
from AttnSegLib.slicer_logic import SceneLogic

REPO = Path(__file__).resolve().parents[1]
CASE = "hippocampus_001"
SAMPLE = REPO / "Resources" / "SampleData"
PICTURES = REPO / "Resources" / "Screenshots" / "maps"
BEGIN = "<!-- BEGIN map pictures: written by `python -m training.map_pictures`; rerun it, do not edit -->"
END = "<!-- END map pictures -->"
PICTURE_DPI = 72
PICTURE_WIDTH_PX = 480


def reference_centre_ras(label_path: Path) -> tuple[float, float, float]:
    """The centre (RAS mm) of the labelled voxels of a (D, H, W) label map."""
    labels = read_image(label_path)
    k, j, i = np.argwhere(np.asarray(labels.array) > 0).mean(axis=0)
    x, y, z, _ = labels.geometry.ijk_to_lps() @ np.array([i, j, k, 1.0])
    return -float(x), -float(y), float(z)


def model_map_names(names, card) -> list[str]:
    """The map volumes among ``names`` that are the model's own (not its probabilities or uncertainty)."""
    return [n for n in names if n != UNCERTAINTY and not n.startswith(PROBABILITY_PREFIX) and card.map_spec(n)]


def draw_package(package, logic: SceneLogic, image, centre_ras, folder: Path) -> list[tuple[str, Path]]:
    """Segment ``image`` with ``package`` and draw each of its model map volumes; (volume, picture) pairs."""
    if CASE not in package.card.held_out_case_names:
        raise PackageError(f"{package.name} trained on {CASE}: its maps on it would not show a held-out case; "
                           "pick a package with the sample among its validation cases")
    result = logic.segment([image], package, device="cpu")
    drawn = []
    for name in model_map_names(result.mapNodes, package.card):
        legend = logic.mapLegend(result.mapNodes[name])
        title = f"{package.name}: {map_title(name)} on held-out {CASE}, colours {legend.first:.3g} to {legend.last:.3g}"
        path = render_review(logic, result.segmentationNode, folder / f"{package.name}.{name}.png", name,
                             title=title, centre_ras=centre_ras, dpi=PICTURE_DPI)
        with PILImage.open(path) as picture:  # 256 colours: a third of the bytes, no visible change
            quantized = picture.convert("RGB").quantize(256)
        quantized.save(path, optimize=True)
        drawn.append((name, path))
    return drawn


def readme_block(pictures: list, readme: Path) -> str:
    """The README section: per (package, [(map volume, picture)]) of ``pictures``, a table row for each
    volume with its picture and its figures."""
    lines = [BEGIN, "", "#### Every map on a held-out crop", "",
             f"Each package's maps on the held-out sample `{CASE}`, segmented as the Slicer panel does it, over the "
             "T1 through the centre of the reference hippocampus, with the model's segment outlines; dark to bright "
             "is the card's display range, low to high (high to low for a confidence, so that its doubt is "
             "bright). The sentence is what the card measured of the map on its "
             "validation cases, as the panel and the web page show it beside the map.", "",
             "| map | on the hippocampus | measured on the validation cases (model card) |", "|---|---|---|"]
    for package, drawn in pictures:
        for name, path in drawn:
            spec = package.card.map_spec(name)
            unit = f"<br>unit: {spec.unit}" if spec.unit else ""
            link = path.relative_to(readme.parent).as_posix()
            note = information_note(package.card, name) or "Not measured: the card has no figures for this map."
            lines.append(f"| {package.name}<br>`{name}`{unit} | <img src=\"{link}\" width=\"{PICTURE_WIDTH_PX}\" "
                         f"alt=\"{map_title(name)} of {package.name} on {CASE}\"> | {note} |")
    return "\n".join(lines + ["", END])


def write_block(readme: Path, block: str) -> None:
    """Put ``block`` in place of the one between the markers, or before the "## Results" heading."""
    text = readme.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        text = before + block + rest.split(END, 1)[1]
    else:
        heading = "\n## Results\n"
        if heading not in text:
            raise SystemExit(f"error: {readme} has neither the map-pictures markers nor a '## Results' heading")
        text = text.replace(heading, f"\n{block}\n{heading}", 1)
    readme.write_text(text, encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.map_pictures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=REPO / "Resources" / "Models", help="folder of packages")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--output", type=Path, default=PICTURES, help="folder for the pictures")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    for stale in args.output.glob("*.png"):
        stale.unlink()  # a map a retrained package no longer has leaves no picture behind
    centre = reference_centre_ras(SAMPLE / f"{CASE}_label.nii.gz")
    pictures = []
    try:
        for folder in sorted(p.parent for p in args.models.glob("*/model.json")):
            package = load_package(folder)
            if not package.card.maps:
                continue
            logic = SceneLogic(newScene())
            image = logic.loadVolume(SAMPLE / f"{CASE}_image.nii.gz")
            drawn = draw_package(package, logic, image, centre, args.output)
            pictures.append((package, drawn))
            print(f"{package.name}: {', '.join(name for name, _ in drawn)}")
    except PackageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_block(args.readme, readme_block(pictures, args.readme))
    print(f"wrote {sum(len(drawn) for _, drawn in pictures)} pictures to {args.output} and their section to {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
