"""Model packages: a good one loads from a folder and a zip; every kind of bad one is refused with a
message that names the problem."""
from __future__ import annotations

import hashlib
import json
import shutil
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from AttnSegLib import models
from AttnSegLib.package import PackageError, load_package, save_package

CARD = {
    "name": "tiny_unet",
    "architecture": {"name": "unet", "kwargs": {"features": [4, 8]}},
    "modalities": [{"name": "T1", "normalization": "zscore"}],
    "classes": [{"value": 0, "name": "background"}, {"value": 1, "name": "Anterior"},
                {"value": 2, "name": "Posterior"}],
    "patch_size_dhw": [16, 16, 16],
}


@pytest.fixture
def package_dir(tmp_path):
    torch.manual_seed(0)
    net = models.build("unet", 1, 3, features=[4, 8])
    save_package(tmp_path / "pkg", CARD, net.state_dict())
    return tmp_path / "pkg"


def _edit_card(folder, **changes):
    card = json.loads((folder / "model.json").read_text())
    card.update(changes)
    (folder / "model.json").write_text(json.dumps(card))


def test_round_trip_rebuilds_the_same_network(package_dir):
    package = load_package(package_dir)
    assert package.card["schema_version"] == 1 and len(package.sha256) == 64
    net = package.build_network()
    torch.manual_seed(0)
    reference = models.build("unet", 1, 3, features=[4, 8])
    for (k, a), (_, b) in zip(net.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), k


def test_zip_package_loads(package_dir, tmp_path):
    archive = shutil.make_archive(str(tmp_path / "tiny_unet"), "zip", package_dir)
    assert load_package(archive).name == "tiny_unet"


@pytest.mark.parametrize("change, message", [
    ({"schema_version": 99}, "schema version 99 is not supported"),
    ({"architecture": {"name": "vnet"}}, "unknown architecture 'vnet'"),
    ({"classes": [{"value": 0, "name": "bg"}]}, "'classes' must list"),
    ({"patch_size_dhw": [16, 16]}, "patch_size_dhw"),
    ({"weights_sha256": "0" * 64}, "does not match the card"),
    ({"inference": {"review_map": "difficulty"}}, "'inference.review_map' must be 'uncertainty' or one of"),
])
def test_bad_cards_are_refused(package_dir, change, message):
    _edit_card(package_dir, **change)
    with pytest.raises(PackageError, match=message):
        load_package(package_dir)


def test_missing_key_is_named(package_dir):
    card = json.loads((package_dir / "model.json").read_text())
    del card["modalities"]
    (package_dir / "model.json").write_text(json.dumps(card))
    with pytest.raises(PackageError, match="lacks required key.*modalities"):
        load_package(package_dir)


def test_invalid_json_is_refused(package_dir):
    (package_dir / "model.json").write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        load_package(package_dir)


def _replace_weights(folder, write):
    """Swap the weights file and re-sign the card, so only the content is wrong."""
    write(folder / "weights.safetensors")
    _edit_card(folder, weights_sha256=hashlib.sha256((folder / "weights.safetensors").read_bytes()).hexdigest())


def test_weights_that_do_not_fit_are_refused(package_dir):
    wrong = models.build("unet", 1, 3, features=[4, 16]).state_dict()
    _replace_weights(package_dir, lambda path: save_file(wrong, str(path)))
    with pytest.raises(PackageError, match="do not fit architecture 'unet'.*wrong shape"):
        load_package(package_dir)


def test_pickle_is_never_loaded(package_dir):
    state = models.build("unet", 1, 3, features=[4, 8]).state_dict()
    _replace_weights(package_dir, lambda path: torch.save(state, path))
    with pytest.raises(PackageError, match="not a valid safetensors file"):
        load_package(package_dir)


def test_zip_with_path_traversal_is_refused(package_dir, tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(package_dir / "model.json", "model.json")
        z.write(package_dir / "weights.safetensors", "weights.safetensors")
        z.writestr("../../outside.txt", "x")
    with pytest.raises(PackageError, match="path traversal"):
        load_package(archive)
    assert not (tmp_path.parent / "outside.txt").exists()


def test_missing_files_and_unknown_names(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackageError, match="has no model.json"):
        load_package(tmp_path / "empty")
    with pytest.raises(PackageError, match="no model package 'does-not-exist'"):
        load_package("does-not-exist")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(PackageError, match="not a valid zip"):
        load_package(tmp_path / "w.safetensors")
