"""The README's map pictures (``python -m training.map_pictures``) follow the shipped cards: one row per
model map of every shipped package with maps, its picture present, its sentence the card's measured
information as the panel and the web page show it. After a package is retrained, rerun the script."""
from __future__ import annotations

from AttnSegLib.outputs import information_note
from AttnSegLib.package import load_package
from conftest import REPO
from training.map_pictures import BEGIN, END, model_map_names

README = REPO / "README.md"


def _block() -> str:
    text = README.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, "README has no map-pictures section: run python -m training.map_pictures"
    return text.split(BEGIN, 1)[1].split(END, 1)[0]


def test_readme_shows_every_shipped_map_with_its_picture_and_the_cards_figures():
    rows = {}
    for line in _block().splitlines():
        if line.startswith("| hippocampus"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            package, name = cells[0].split("<br>")[0], cells[0].split("`")[1]
            rows[package, name] = cells
    expected = []
    for folder in sorted(p.parent for p in (REPO / "Resources" / "Models").glob("*/model.json")):
        card = load_package(folder).card
        expected += [(card.name, name) for name in model_map_names(card.metrics.get("map_information", {}), card)]
    assert expected and sorted(rows) == sorted(expected), "rerun python -m training.map_pictures"
    for (package, name), (_, picture, note) in rows.items():
        card = load_package(REPO / "Resources" / "Models" / package).card
        assert note == information_note(card, name), f"{package} {name}: rerun python -m training.map_pictures"
        link = picture.split('src="')[1].split('"')[0]
        assert (REPO / link).is_file(), f"{link} is missing: rerun python -m training.map_pictures"
