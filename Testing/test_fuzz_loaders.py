"""Fuzzing the two loaders that read files from strangers: images and model packages.

Property: every input either loads, or raises :class:`ImageError` / :class:`PackageError` (whose
message is shown to the user as one line) — never another exception, never a crash of the process.
Inputs are random bytes behind each format's magic, and real headers (NIfTI-1 binary fields, NRRD and
MetaImage text fields, safetensors headers, model cards, zip archives) with fields replaced by hostile
values; file and folder names of any bytes (written and read back); card values that, when a card
loads, must also segment an image. Each property runs a fixed number of examples with no deadline, so the suite stays bounded
(a few seconds each) on a shared CI machine.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from AttnSegLib import models
from AttnSegLib.image import Geometry, Image, ImageError, read_image, write_image
from AttnSegLib.inference import Predictor
from AttnSegLib.package import PackageError, load_package, save_package

# ATTNSEG_FUZZ_EXAMPLES=2000 for a deep run; CI runs the default.
FUZZ = settings(max_examples=int(os.environ.get("ATTNSEG_FUZZ_EXAMPLES", "100")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

# Values that break parsers: zero, negative, huge, non-finite, wrong type.
HOSTILE_NUMBERS = [0, 1, -1, 2, 3, 7, 255, 32767, -32768, 65535, 2**31 - 1, -(2**31), 2**40,
                   0.0, -0.0, 1e-300, 1e30, -1e30, math.nan, math.inf, -math.inf]
HOSTILE_TOKENS = ["0", "-1", "1", "65536", "4294967296", "99999999999999999999", "nan", "inf", "-inf", "",
                  "abc", "(1,0,0)", "(nan,nan,nan)", "(0,0,0) (0,0,0) (0,0,0)", "none", "1e308", "\x00", "é",
                  "raw", "gzip", "bzip2", "ascii", "hex", "int", "float", "double", "uchar", "block",
                  "little", "big", "3", "4", "2", "left-posterior-superior", "RAS", "LPI", "MET_FLOAT",
                  "MET_STRING", "True", "False", "LIST", "1 2", "-1 -1 -1", "0 0 0", "99999 99999 99999",
                  "1 0 0 0 1 0 0 0 0"]


def _load_image_bytes(data: bytes, suffix: str, must_refuse: bool = False) -> None:
    """Write ``data`` to a file with ``suffix`` and read it; only ImageError may escape."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"case{suffix}"
        path.write_bytes(data)
        try:
            image = read_image(path)
        except ImageError as err:
            assert str(err).startswith(str(path)) and "\n" not in str(err)
            return
        assert not must_refuse, "a truncated file was read as if it were whole"
        assert isinstance(image, Image) and image.array.ndim == 3
        assert image.array.shape == tuple(reversed(image.geometry.size))
        assert all(math.isfinite(s) and s > 0 for s in image.geometry.spacing)


class Seeds(dict):
    """Seed files by suffix; a short repr keeps hypothesis' failure reports readable."""

    def __repr__(self) -> str:
        return f"Seeds({', '.join(f'{k}: {len(v)} bytes' for k, v in self.items())})"


@pytest.fixture(scope="module")
def seed_images(hippocampus_case, tmp_path_factory) -> Seeds:
    """A real case as uncompressed NIfTI-1, NRRD (raw) and MetaImage bytes (geometry only, no
    carried-over metadata, so every header line is one a reader interprets)."""
    folder = tmp_path_factory.mktemp("seeds")
    original = sitk.ReadImage(str(hippocampus_case[0]))
    image = sitk.GetImageFromArray(sitk.GetArrayFromImage(original))
    image.CopyInformation(original)
    out = Seeds()
    for suffix in (".nii", ".nrrd", ".mha"):
        sitk.WriteImage(image, str(folder / f"seed{suffix}"), False)
        out[suffix] = (folder / f"seed{suffix}").read_bytes()
    return out


# -- images -------------------------------------------------------------------------------------
MAGICS = [b"", struct.pack("<i", 348), struct.pack(">i", 348), struct.pack("<i", 540), b"NRRD0004\n",
          b"NRRD0001\ntype: float\ndimension: 3\n", b"ObjectType = Image\nNDims = 3\n", b"\x1f\x8b\x08\x00",
          b"DICM", b"\x89PNG\r\n\x1a\n"]


@FUZZ
@given(magic=st.sampled_from(MAGICS), body=st.binary(max_size=1500),
       suffix=st.sampled_from([".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".dcm", ""]))
def test_random_bytes_never_escape_as_another_error(magic, body, suffix):
    _load_image_bytes(magic + body, suffix)


# NIfTI-1 header fields (offset, struct format) a reader trusts.
NIFTI_FIELDS = {"sizeof_hdr": (0, "i"), "dim": (40, "h"), "dim1": (42, "h"), "dim2": (44, "h"), "dim3": (46, "h"),
                "dim4": (48, "h"), "datatype": (70, "h"), "bitpix": (72, "h"), "pixdim0": (76, "f"),
                "pixdim1": (80, "f"), "pixdim3": (88, "f"), "vox_offset": (108, "f"), "scl_slope": (112, "f"),
                "scl_inter": (116, "f"), "qform_code": (252, "h"), "sform_code": (254, "h"),
                "quatern_b": (256, "f"), "quatern_d": (264, "f"), "qoffset_x": (268, "f"), "srow_x0": (280, "f"),
                "srow_y1": (300, "f"), "srow_z2": (320, "f"), "magic": (344, "4s")}


def _pack(fmt: str, value) -> bytes:
    if fmt == "4s":
        return bytes(str(value).encode()[:4]).ljust(4, b"\0")
    if isinstance(value, str):  # a magic string given to a numeric field: write its bytes as a number
        value = int.from_bytes(value.encode()[:2], "little")
    if fmt in ("h", "i"):
        if not isinstance(value, int):
            value = 0 if not math.isfinite(value) else int(value)
        bits = 16 if fmt == "h" else 32
        value = (value + 2 ** (bits - 1)) % 2**bits - 2 ** (bits - 1)
    return struct.pack("<" + fmt, float(value) if fmt == "f" else value)


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(sorted(NIFTI_FIELDS)), st.sampled_from(HOSTILE_NUMBERS + ["n+1", "ni1"])),
                      max_size=4),
       flips=st.lists(st.tuples(st.integers(0, 351), st.integers(0, 255)), max_size=3),
       keep=st.one_of(st.none(), st.integers(0, 70000)), gzipped=st.booleans())
def test_mutated_nifti_headers_load_or_are_refused(seed_images, edits, flips, keep, gzipped):
    """...and a cut copy of an intact file is always refused (ITK alone would fill the gap with 0)."""
    data = bytearray(seed_images[".nii"])
    truncated_only = not edits and not flips and keep is not None and keep < len(data)
    for field, value in edits:
        offset, fmt = NIFTI_FIELDS[field]
        packed = _pack(fmt, value)
        data[offset:offset + len(packed)] = packed
    for offset, byte in flips:
        data[offset] = byte
    data = bytes(data[:keep] if keep is not None else data)
    _load_image_bytes(gzip.compress(data, 1) if gzipped else data, ".nii.gz" if gzipped else ".nii",
                      must_refuse=truncated_only)


def _mutate_text_header(seed: bytes, separator: bytes, edits, drop, data_keep) -> bytes:
    """Replace (or drop) field values of a text header ``key<separator>value`` and cut the voxel data."""
    end = seed.index(b"\n\n") + 2 if separator == b": " else seed.index(b"ElementDataFile = LOCAL\n") + 24
    header, body = seed[:end].decode("latin-1").splitlines(), seed[end:]
    for index, token in edits:
        line = index % len(header)
        if separator.decode() in header[line]:
            key = header[line].split(separator.decode())[0]
            header[line] = f"{key}{separator.decode()}{token}"
    if drop is not None:
        del header[drop % len(header)]
    text = "\n".join(header) + ("\n\n" if separator == b": " else "\n")
    return text.encode("latin-1") + body[:data_keep]


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 30), st.sampled_from(HOSTILE_TOKENS)), min_size=1, max_size=3),
       drop=st.one_of(st.none(), st.integers(0, 30)), data_keep=st.one_of(st.none(), st.integers(0, 70000)),
       fmt=st.sampled_from([".nrrd", ".mha"]))
def test_mutated_text_headers_load_or_are_refused(seed_images, edits, drop, data_keep, fmt):
    separator = b": " if fmt == ".nrrd" else b" = "
    _load_image_bytes(_mutate_text_header(seed_images[fmt], separator, edits, drop, data_keep), fmt)


# -- model packages -----------------------------------------------------------------------------
CARD = {
    "name": "fuzz_unet",
    "architecture": {"name": "unet", "kwargs": {"features": [2, 4]}},
    "modalities": [{"name": "T1", "normalization": "zscore"}],
    "classes": [{"value": 0, "name": "background"}, {"value": 1, "name": "a", "color": [255, 0, 0]},
                {"value": 2, "name": "b"}],
    "patch_size_dhw": [16, 16, 16], "spacing_xyz_mm": [1.0, 1.0, 1.0], "orientation": "RAS",
    "inference": {"overlap": 0.5, "batch_size": 2}, "maps": {},
}


@pytest.fixture(scope="module")
def seed_package(tmp_path_factory) -> Seeds:
    """(card, weights bytes) of a real, valid package."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("package")
    package = save_package(folder, CARD, models.build("unet", 1, 3, features=[2, 4]).state_dict())
    return Seeds(card=package.card.to_dict(), weights=(folder / "weights.safetensors").read_bytes())


def _load_package_files(files: dict[str, bytes]) -> None:
    """Write a package folder and load it; only PackageError may escape, and a package that loads
    must rebuild its network."""
    with tempfile.TemporaryDirectory() as folder:
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
        _expect_package_or_error(Path(folder))


def _expect_package_or_error(path: Path) -> None:
    try:
        package = load_package(path)
    except PackageError as err:
        assert "\n" not in str(err)
        return
    network = package.build_network()
    assert sum(p.numel() for p in network.parameters()) > 0


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.sampled_from(HOSTILE_NUMBERS) | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8)
CARD_PATHS = [("name",), ("architecture",), ("architecture", "name"), ("architecture", "kwargs"),
              ("architecture", "kwargs", "features"), ("modalities",), ("modalities", 0),
              ("modalities", 0, "name"), ("modalities", 0, "normalization"), ("classes",), ("classes", 0),
              ("classes", 1, "value"), ("classes", 2, "name"), ("patch_size_dhw",), ("patch_size_dhw", 1),
              ("spacing_xyz_mm",), ("spacing_xyz_mm", 2), ("orientation",), ("crop_to_nonzero",),
              ("inference",), ("inference", "overlap"), ("inference", "batch_size"),
              ("inference", "tta_flip_axes"), ("maps",), ("schema_version",), ("weights_sha256",)]


def _set_path(card, path, value, delete: bool):
    target = card
    for key in path[:-1]:
        if isinstance(target, dict) and key in target or isinstance(target, list) and isinstance(key, int) and key < len(target):
            target = target[key]
        else:
            return
    last = path[-1]
    if isinstance(target, dict) or (isinstance(target, list) and isinstance(last, int) and last < len(target)):
        if delete and isinstance(target, dict):
            target.pop(last, None)
        else:
            target[last] = value


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(CARD_PATHS), JSON_VALUES, st.booleans()), min_size=1, max_size=3),
       resign=st.booleans())
def test_mutated_model_cards_load_or_are_refused(seed_package, edits, resign):
    card, weights = json.loads(json.dumps(seed_package["card"])), seed_package["weights"]
    for path, value, delete in edits:
        _set_path(card, path, value, delete)
    if resign and isinstance(card, dict):
        card["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    _load_package_files({"model.json": json.dumps(card).encode(), "weights.safetensors": weights})


@FUZZ
@given(text=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                      st.just(b"[" * 5000 + b"]" * 5000), st.just(b'{"schema_version": 1' + b"1" * 5000 + b"}")))
def test_model_json_that_is_not_json_is_refused(seed_package, text):
    _load_package_files({"model.json": text, "weights.safetensors": seed_package["weights"]})


def _safetensors_with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@FUZZ
@given(tensor=st.sampled_from(sorted(models.build("unet", 1, 3, features=[2, 4]).state_dict())),
       field=st.sampled_from(["dtype", "shape", "data_offsets", None]), value=JSON_VALUES,
       length_override=st.one_of(st.none(), st.sampled_from([0, 1, 7, 2**31, 2**63, 2**64 - 1])),
       cut=st.one_of(st.none(), st.integers(0, 4000)))
def test_mutated_safetensors_with_a_valid_signature_are_refused(seed_package, tensor, field, value,
                                                                 length_override, cut):
    """The hash matches (a stranger signs their own file): the safetensors parser and the shape
    check must refuse what is wrong, without unpickling or crashing."""
    card, weights = seed_package["card"], seed_package["weights"]
    size = struct.unpack("<Q", weights[:8])[0]
    header, data = json.loads(weights[8:8 + size]), weights[8 + size:]
    if field is not None:
        header[tensor][field] = value
    else:
        header.pop(tensor)
    blob = _safetensors_with_header(header, data)
    if length_override is not None:
        blob = struct.pack("<Q", length_override) + blob[8:]
    if cut is not None:
        blob = blob[:cut]
    signed = {**card, "weights_sha256": hashlib.sha256(blob).hexdigest()}
    _load_package_files({"model.json": json.dumps(signed).encode(), "weights.safetensors": blob})


ENTRY_NAMES = ["model.json", "weights.safetensors", "pkg/model.json", "pkg/weights.safetensors",
               "../model.json", "../../weights.safetensors", "/model.json", "C:model.json", "\\model.json",
               "pkg/", "a/../model.json", "readme.txt", "model.json/", "pkg\\..\\x"]


@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")  # duplicates are part of the fuzz
@FUZZ
@given(entries=st.lists(st.tuples(st.sampled_from(ENTRY_NAMES), st.sampled_from(["card", "weights", "random"]),
                                  st.binary(max_size=64), st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])),
                        max_size=4),
       damage=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_random_and_damaged_zips_load_or_are_refused(seed_package, entries, damage, cut):
    card, weights = seed_package["card"], seed_package["weights"]
    contents = {"card": json.dumps(card).encode(), "weights": weights}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, kind, noise, method in entries:
            archive.writestr(zipfile.ZipInfo(name), contents.get(kind, noise), compress_type=method)
    data = bytearray(buffer.getvalue())
    for offset, byte in damage:
        if data:
            data[offset % len(data)] = byte
    data = bytes(data[:cut] if cut is not None else data)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "package.zip"
        path.write_bytes(data)
        _expect_package_or_error(path)
        assert sorted(p.name for p in Path(folder).iterdir()) == ["package.zip"]  # nothing was extracted


def test_the_seeds_themselves_load(seed_images, seed_package, tmp_path):
    """Guard for the fuzzers above: unmutated seeds are valid, so refusals come from the mutations."""
    for suffix, data in seed_images.items():
        (tmp_path / f"seed{suffix}").write_bytes(data)
        assert read_image(tmp_path / f"seed{suffix}").array.shape == (35, 51, 35)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "model.json").write_text(json.dumps(seed_package["card"]))
    (tmp_path / "pkg" / "weights.safetensors").write_bytes(seed_package["weights"])
    assert load_package(tmp_path / "pkg").name == "fuzz_unet"
    assert np.isfinite(read_image(tmp_path / "seed.nii").array).all()


# -- file names ----------------------------------------------------------------------------------
# Any bytes but "/" and NUL, as a file or folder name on a Linux disk (Latin-1 from a Windows share,
# stray bytes, UTF-8): SimpleITK aborted the whole process on names that are not UTF-8.
NAME_BYTES = st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_")).filter(
    lambda b: b not in (b".", b".."))


@FUZZ
@given(folder=NAME_BYTES, stem=NAME_BYTES, suffix=st.sampled_from([".nii", ".nii.gz", ".nrrd", ".mha"]))
def test_images_under_any_file_name_are_written_and_read_back(folder, stem, suffix):
    image = Image(np.arange(60, dtype=np.float32).reshape(3, 4, 5),
                  Geometry((5, 4, 3), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    with tempfile.TemporaryDirectory() as root:
        path = Path(os.fsdecode(os.path.join(os.fsencode(root), folder, stem + suffix.encode())))
        write_image(image, path)
        back = read_image(path)
        np.testing.assert_array_equal(back.array, image.array)
        assert back.geometry.same_grid(image.geometry)
        assert os.listdir(os.path.join(os.fsencode(root), folder)) == [stem + suffix.encode()]  # no temporary left


# -- card values that load must also predict -----------------------------------------------------------
CARD_NUMBERS = st.sampled_from(HOSTILE_NUMBERS) | st.floats(1e-4, 1e4) | st.integers(-2, 300)
CARD_VALUE_EDITS = {
    ("spacing_xyz_mm",): st.lists(CARD_NUMBERS, min_size=3, max_size=3),
    ("patch_size_dhw",): st.lists(st.sampled_from([1, 2, 3, 4, 7, 8, 16, 17, 33, 64, 0, -1, 2**20]), min_size=3, max_size=3),
    ("inference", "overlap"): CARD_NUMBERS,
    ("inference", "batch_size"): CARD_NUMBERS,
    ("inference", "tta_flip_axes"): st.lists(st.integers(-1, 3), max_size=4),
    ("orientation",): st.sampled_from(["RAS", "LPS", "PIL", "RRR", "ras", "", None, 3]),
    ("modalities", 0, "normalization"): st.sampled_from(["zscore", "zscore_nonzero", "percentile_zscore", "none",
                                                          "minmax", None]),
    ("crop_to_nonzero",): st.sampled_from([True, False, 1, None]),
}


@settings(max_examples=int(os.environ.get("ATTNSEG_FUZZ_EXAMPLES", "30")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.sampled_from(sorted(CARD_VALUE_EDITS)).flatmap(
    lambda path: st.tuples(st.just(path), CARD_VALUE_EDITS[path])), min_size=1, max_size=3))
def test_card_values_that_load_also_predict(seed_package, edits):
    """A card with values out of physical range is refused when it loads; one that loads segments a
    small image onto its own grid (probabilities summing to 1), or refuses it in one line."""
    card = json.loads(json.dumps(seed_package["card"]))
    for path, value in edits:
        _set_path(card, path, value, False)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "model.json").write_text(json.dumps(card))
        (Path(folder) / "weights.safetensors").write_bytes(seed_package["weights"])
        try:
            package = load_package(folder)
        except PackageError as err:
            assert "\n" not in str(err)
            event("refused when loading")
            return
        _segment_or_refused(package, (1.1, 0.9, 1.3))


def _segment_or_refused(package, spacing) -> None:
    """Segment a small noise image of ``spacing`` (mm): the result lies on the image's own grid with
    probabilities summing to 1, or the image is refused in one line."""
    image = Image(np.random.default_rng(0).normal(100, 20, (12, 14, 10)).astype(np.float32),
                  Geometry((10, 14, 12), tuple(spacing), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    try:
        result = Predictor(package, device="cpu", with_maps=False).predict([image])
    except ImageError as err:
        assert "\n" not in str(err)
        event("image refused")
        return
    event("segmented")
    assert result.labels.geometry.same_grid(image.geometry)
    np.testing.assert_allclose(result.probabilities.array.sum(axis=0), 1.0, atol=1e-4)


# -- batch folders of any file names -----------------------------------------------------------------
@FUZZ
@given(stems=st.lists(NAME_BYTES | st.sampled_from([b"..", b".", b"a", b"A", b"~", b" "]), min_size=1, max_size=4),
       suffixes=st.lists(st.sampled_from([".nii", ".nii.gz", ".nrrd", ".mha"]), min_size=4, max_size=4))
def test_batch_case_names_from_any_file_names_are_unique_and_inside_the_output(stems, suffixes):
    """Whatever a batch folder's files are called, every case gets its own folder directly inside
    --output (names equal but for letter case collide on Windows and macOS disks), or the batch is
    refused in one line before anything is written."""
    from AttnSegLib.cli import UsageError, _group_cases

    with tempfile.TemporaryDirectory() as root:
        folder = os.path.join(os.fsencode(root), b"cases")
        os.mkdir(folder)
        for stem, suffix in zip(stems, suffixes):
            open(os.path.join(folder, stem + suffix.encode()), "wb").close()
        output = Path(root) / "out"
        try:
            cases = _group_cases([Path(os.fsdecode(folder))], 1)
        except UsageError as err:
            assert "\n" not in str(err)
            event("refused")
            return
        event("grouped")
        assert len({case.casefold() for case in cases}) == len(cases)
        for case in cases:
            assert os.path.dirname(os.path.normpath(output / case)) == os.path.normpath(output), case


# -- image spacings in any units -----------------------------------------------------------------------
@settings(max_examples=int(os.environ.get("ATTNSEG_FUZZ_EXAMPLES", "12")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(spacing=st.lists(st.sampled_from([1e-300, 1e-6, 1e-3, 0.04, 0.3, 1.0, 3.0, 19.0, 25.0, 100.0, 1e4, 1e300]),
                        min_size=3, max_size=3))
def test_images_of_any_spacing_segment_or_are_refused_in_one_line(spacing):
    """The default (localising) model: a header's spacing in any units either segments onto the
    image's own grid or is refused in one line (100 mm voxels ended in an allocation failure inside
    the localisation's resampling)."""
    _segment_or_refused(load_package("hippocampus_difficulty_aware"), spacing)
