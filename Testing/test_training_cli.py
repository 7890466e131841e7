"""Small command-line gaps of the training side, on the shipped default and the real hippocampus data:
``attnseg info --model PATH`` and ``training.evaluate --cases``."""
from __future__ import annotations

import csv
import json

from AttnSegLib import cli
from AttnSegLib.package import default_package
from training import evaluate


def test_info_describes_one_package_by_path(capsys):
    package = default_package()
    assert cli.main(["info", "--model", str(package.path)]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"{package.name}  ({package.path})")
    assert f"weights sha256 {package.sha256}" in said and "validation mean Dice 0.8834 on 40 cases" in said
    assert cli.main(["info", "--model", str(package.path), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["sha256"] == package.sha256 and described["card"]["training"]["config"]["name"] == package.name
    assert cli.main(["info", "--model", str(package.path / "missing")]) == 2
    assert "no model package" in capsys.readouterr().err


def test_evaluate_scores_only_the_cases_asked_for(tmp_path, capsys):
    package = default_package()
    wanted = sorted(package.card["training"]["validation_cases"])[:2]
    assert evaluate.main(["--model", package.name, "--cases", *wanted, "--output", str(tmp_path / "two"),
                          "--device", "cpu"]) == 0
    with open(tmp_path / "two" / "metrics.csv") as handle:
        assert sorted({row["case"] for row in csv.DictReader(handle)}) == wanted
    listing = tmp_path / "cases.txt"
    listing.write_text(wanted[0] + "\n")
    assert evaluate.main(["--model", package.name, "--cases", str(listing), "--output", str(tmp_path / "one"),
                          "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["cases"] == 1
    assert evaluate.main(["--model", package.name, "--cases", "hippocampus_999", "--output", str(tmp_path / "x")]) == 2
    assert "hippocampus_999 is not among the 40 validation cases" in capsys.readouterr().err
