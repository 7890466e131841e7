"""Interactive correction (:mod:`AttnSegLib.refine`, ``attnseg refine``) on real hippocampus volumes with
the shipped weights: clicks change nothing farther than 15 mm away, a positive click in a missed region
raises Dice for every method, the simulated user clicks where the error is deepest, the shipped
refinement package fits the default model and never trained on its validation cases, and the command
writes a complete result (recording its clicks, so refinements chain) or refuses in one line."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AttnSegLib.cli import main
from AttnSegLib.image import Geometry, Image, read_image
from AttnSegLib.inference import Predictor
from AttnSegLib.package import default_package_name, load_package
from AttnSegLib.refine import (METHODS, RADIUS_MM, Click, ClickError, Refiner, click_voxel,
                               find_refinement_package, parse_click, simulated_click, voxel_click)

REPO = Path(__file__).resolve().parents[1]
SAMPLE_IMAGE = REPO / "Resources" / "SampleData" / "hippocampus_001_image.nii.gz"
SAMPLE_LABEL = REPO / "Resources" / "SampleData" / "hippocampus_001_label.nii.gz"
CLASS_NAMES = ["background", "Anterior", "Posterior"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def package():
    return load_package(default_package_name())


@pytest.fixture(scope="module")
def sample(package):
    """The held-out sample case, its expert label and the default model's result on it."""
    image = read_image(SAMPLE_IMAGE)
    truth = read_image(SAMPLE_LABEL).array.astype(np.int64)
    result = Predictor(package, device="cpu", with_maps=False).predict([image])
    return image, truth, result


@pytest.fixture(scope="module")
def refiners(package):
    return {m: Refiner(m, find_refinement_package(package.card)) for m in METHODS}


def dice(labels, truth, k):
    a, b = labels == k, truth == k
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def distances_mm(shape, voxel, spacing_dhw) -> np.ndarray:
    grids = np.meshgrid(*[(np.arange(n) - v) * s for n, v, s in zip(shape, voxel, spacing_dhw)], indexing="ij")
    return np.sqrt(sum(g ** 2 for g in grids))


def test_clicks_parse_and_bad_clicks_are_refused(sample):
    image, _, _ = sample
    click = parse_click("-12.5, -20, 17, anterior", CLASS_NAMES)
    assert click == Click((-12.5, -20.0, 17.0), 1)
    assert parse_click("0,0,0,Background", CLASS_NAMES).label == 0
    assert np.allclose(click_voxel(voxel_click((3, 4, 5), 2, image.geometry), image.geometry), (3, 4, 5))
    with pytest.raises(ClickError, match="unknown class 'Tail'.*Anterior, Posterior or background"):
        parse_click("1,2,3,Tail", CLASS_NAMES)
    with pytest.raises(ClickError, match="X,Y,Z,CLASS"):
        parse_click("1,2,Anterior", CLASS_NAMES)
    with pytest.raises(ClickError, match="outside the image"):
        click_voxel(Click((500.0, 0.0, 0.0), 1), image.geometry)


@pytest.mark.parametrize("method", METHODS)
def test_a_click_on_the_far_face_of_an_even_sized_volume_is_refused_not_a_crash(method, sample, refiners):
    """The image spans voxel indices [-0.5, n - 0.5): a click exactly on the far face (index n - 0.5)
    lies on no voxel. It was accepted and rounded (half to even) to index n when n is even, past the
    array: IndexError in the click's update. Now it is refused in one line like any click outside; a
    click just inside sets the last voxel."""
    image, _, result = sample
    rows = image.array.shape[1] - 1  # 50: even
    geometry = Geometry((image.geometry.size[0], rows, image.geometry.size[2]), image.geometry.spacing,
                        image.geometry.origin, image.geometry.direction)
    stack = image.array[None, :, :rows].astype(np.float32)
    probabilities = np.ascontiguousarray(result.probabilities.array[:, :, :rows])
    with pytest.raises(ClickError, match="outside the image"):
        refiners[method].refine(stack, probabilities, geometry, [voxel_click((17, rows - 0.5, 17), 1, geometry)])
    refined = refiners[method].refine(stack, probabilities, geometry, [voxel_click((17, rows - 0.51, 17), 1, geometry)])
    assert refined.labels[17, rows - 1, 17] == 1


def test_simulated_user_clicks_the_deepest_point_of_the_largest_error(sample):
    image, truth, result = sample
    labels = result.labels.array
    (index, label) = simulated_click(labels, truth, image.geometry.spacing[::-1])
    assert labels[index] != truth[index] and label == truth[index]
    assert simulated_click(truth, truth, (1.0, 1.0, 1.0)) is None


@pytest.mark.parametrize("method", METHODS)
def test_nothing_farther_than_15_mm_from_the_clicks_changes(method, sample, refiners):
    image, truth, result = sample
    geometry = image.geometry
    spacing = np.asarray(geometry.spacing)[::-1]
    before = result.probabilities.array
    voxels = [(17, 10, 17), (17, 40, 17)]  # the two ends of the hippocampus crop
    clicks = [voxel_click(v, 1 + i, geometry) for i, v in enumerate(voxels)]
    refined = refiners[method].refine(image.array[None].astype(np.float32), before, geometry, clicks)
    moved = np.any(refined.probabilities != before, axis=0)
    nearest = np.minimum(*[distances_mm(moved.shape, v, spacing) for v in voxels])
    assert moved.any() and moved[nearest <= RADIUS_MM].any()
    assert not moved[nearest > RADIUS_MM].any()
    assert np.array_equal(refined.changed, moved)
    assert np.array_equal(refined.labels, refined.probabilities.argmax(axis=0))
    assert np.allclose(refined.probabilities.sum(axis=0), 1.0, atol=1e-4)
    assert [refined.labels[v] for v in voxels] == [1, 2]
    assert np.array_equal(before, result.probabilities.array)  # the input is not modified


@pytest.mark.parametrize("method", METHODS)
def test_a_click_reads_nothing_outside_its_reach(method, sample, refiners):
    """``Refiner.reach`` bounds what a click reads (a scene session copies only that much of the scene):
    with every array NaN outside it, a click refines exactly as with the whole arrays; the learned
    update's warm-up runs beforehand change nothing."""
    from AttnSegLib.maps import normalized_entropy

    image, truth, result = sample
    refiner = refiners[method]
    stack = image.array[None].astype(np.float32)
    probabilities = result.probabilities.array.astype(np.float32)
    voxel = (17, 8, 17)  # near the crop's front: the reach is a part of the crop
    click = voxel_click(voxel, 1, image.geometry)
    whole = refiner.refine(stack, probabilities, image.geometry, [click])
    reach = refiner.reach(np.asarray(voxel, dtype=float), image.geometry, probabilities.shape[1:])
    outside = np.ones(probabilities.shape[1:], dtype=bool)
    outside[reach] = False
    assert outside.any() and not outside.all()
    own = [stack.copy(), probabilities.copy(), normalized_entropy(probabilities)]
    for array in own:
        array[..., outside] = np.nan
    labels = probabilities.argmax(axis=0).astype(np.uint8)
    refiner.warm_up()
    lazy = refiner.refine(own[0], own[1], image.geometry, [click], [], own[2], labels, in_place=True)
    inside = (slice(None), *reach)
    np.testing.assert_array_equal(lazy.probabilities[inside], whole.probabilities[inside])
    np.testing.assert_array_equal(lazy.labels, whole.labels)
    assert not lazy.changed[outside].any()


def test_a_localised_result_with_left_and_right_classes_is_refined_in_place_and_as_a_copy(sample, refiners):
    """A whole-head result has a left and a right copy of each class (their ``part`` is the card's class):
    the learned network refines it through ``class_parts``; the clicked side's class wins at the click,
    the other side's classes stay zero there, probabilities still sum to 1, and ``in_place`` gives the
    same arrays as a copy, in the caller's own arrays."""
    from AttnSegLib.maps import normalized_entropy
    from AttnSegLib.refine import ClickError, class_parts

    image, truth, result = sample
    localised = [{"name": "background"}] + [{"name": f"{side} {part.lower()} hippocampus", "part": part}
                                            for side in ("Left", "Right") for part in ("Anterior", "Posterior")]
    learned = refiners["learned"]
    parts = class_parts(localised, learned.learned.class_names)
    assert parts.tolist() == [0, 1, 2, 1, 2]
    assert class_parts([{"name": n} for n in ("background", "Anterior", "Posterior")],
                       learned.learned.class_names) is None
    with pytest.raises(ClickError, match="knows no class 'Tumour'"):
        class_parts([{"name": "background"}, {"name": "Tumour"}], learned.learned.class_names)
    three = result.probabilities.array
    five = np.zeros((5, *three.shape[1:]), dtype=np.float32)  # the whole crop is the "right" side
    five[0], five[3], five[4] = three
    stack = image.array[None].astype(np.float32)
    voxel = (17, 25, 17)
    click = voxel_click(voxel, 4, image.geometry)  # Right posterior
    copy = learned.refine(stack, five, image.geometry, [click], parts=parts)
    assert copy.labels[voxel] == 4 and copy.changed.any()
    assert not copy.probabilities[1:3].any()  # no left class appears on the right side
    assert np.allclose(copy.probabilities.sum(axis=0), 1.0, atol=1e-4)
    own, labels, uncertainty = five.copy(), five.argmax(axis=0).astype(np.uint8), normalized_entropy(five)
    same = learned.refine(stack, own, image.geometry, [click], [], uncertainty, labels, parts, in_place=True)
    assert same.probabilities is own and same.labels is labels
    np.testing.assert_array_equal(own, copy.probabilities)
    np.testing.assert_array_equal(labels, copy.labels)


@pytest.mark.parametrize("method", METHODS)
def test_a_positive_click_in_a_missed_region_raises_dice(method, sample, refiners):
    """The model's probabilities with a ball of the anterior hippocampus missed (made background); one
    click at the ball's centre, labelled Anterior, gives back part of it."""
    image, truth, result = sample
    spacing = np.asarray(image.geometry.spacing)[::-1]
    anterior = np.argwhere((truth == 1) & (result.labels.array == 1))
    centre = anterior[np.argmin(np.abs(anterior - anterior.mean(axis=0)).sum(axis=1))]
    missed = result.probabilities.array.copy()
    ball = (distances_mm(truth.shape, centre, spacing) <= 4.0) & (truth == 1)
    missed[:, ball] = np.array([0.9, 0.05, 0.05], dtype=np.float32)[:, None]
    before = dice(missed.argmax(axis=0), truth, 1)
    refined = refiners[method].refine(image.array[None].astype(np.float32), missed, image.geometry,
                                      [voxel_click(centre, 1, image.geometry)])
    assert dice(refined.labels, truth, 1) > before + 0.005, method


def test_a_predictor_result_is_corrected_as_a_result(sample, refiners):
    """``Refiner.refine_result``: the Result of ``Predictor.predict`` in, a Result out with the labels,
    probabilities and uncertainty corrected and every other map kept."""
    image, truth, result = sample
    (index, label) = simulated_click(result.labels.array, truth, image.geometry.spacing[::-1])
    corrected, refined = refiners["learned"].refine_result([image], result, [voxel_click(index, label, image.geometry)])
    assert corrected.labels.array[index] == label and result.labels.array[index] != label
    assert corrected.labels.geometry == result.labels.geometry
    assert np.array_equal(corrected.maps["uncertainty"].array, refined.uncertainty)
    assert set(corrected.maps) == set(result.maps)
    assert corrected.timings == {"refine": refined.seconds}


def test_the_refinement_package_fits_the_default_model_and_never_saw_its_validation_cases(package):
    refinement = find_refinement_package(package.card)
    assert refinement is not None and refinement.card["purpose"] == "refinement"
    assert [c["name"] for c in refinement.classes] == [c["name"] for c in package.classes]
    held_out = set(package.card["training"]["validation_cases"])
    assert held_out <= set(refinement.card["training"]["validation_cases"])
    metrics = refinement.card["metrics"]
    assert metrics["cases"] == len(held_out) and len(metrics["dice_by_clicks"]["mean"]) == 6


def run_main(capsys, *args: str) -> tuple[int, str, list[str]]:
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def test_refine_command_end_to_end_and_chained(sample, tmp_path, capsys):
    image, truth, _ = sample
    assert run_main(capsys, "segment", "-i", str(SAMPLE_IMAGE), "-o", str(tmp_path / "auto"))[0] == 0
    labels = read_image(tmp_path / "auto" / "labels.nii.gz").array
    (index, label) = simulated_click(labels, truth, image.geometry.spacing[::-1])
    x, y, z = voxel_click(index, label, image.geometry).position_lps
    status, out, err = run_main(capsys, "refine", "-i", str(SAMPLE_IMAGE), "-r", str(tmp_path / "auto"),
                                "--click", f"{x},{y},{z},{CLASS_NAMES[label]}", "-o", str(tmp_path / "one"))
    assert status == 0 and err == [] and "learned" in out
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "auto").iterdir())
    report = json.loads((tmp_path / "one" / "report.json").read_text())
    assert report["refinement"]["method"] == "learned" and len(report["refinement"]["clicks"]) == 1
    refined = read_image(tmp_path / "one" / "labels.nii.gz").array
    assert refined[index] == label
    status, _, err = run_main(capsys, "refine", "-i", str(SAMPLE_IMAGE), "-r", str(tmp_path / "one"),
                              "--click", f"{x},{y},{z},{CLASS_NAMES[label]}", "--click", f"{x},{y + 2},{z},background",
                              "-o", str(tmp_path / "two"))
    assert status == 0
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert len(report["refinement"]["clicks"]) == 3 and report["refinement"]["new_clicks"] == 2


@pytest.mark.parametrize("click, message", [
    ("500,0,0,Anterior", "outside the image"),
    ("-10,-20,15,Tail", "unknown class 'Tail'"),
    ("-10,-20,Anterior", "X,Y,Z,CLASS"),
])
def test_bad_clicks_are_refused_in_one_line(click, message, tmp_path, capsys):
    assert run_main(capsys, "segment", "-i", str(SAMPLE_IMAGE), "-o", str(tmp_path / "auto"))[0] == 0
    status, _, err = run_main(capsys, "refine", "-i", str(SAMPLE_IMAGE), "-r", str(tmp_path / "auto"),
                              "--click", click, "-o", str(tmp_path / "out"))
    assert status == 2 and len(err) == 1 and err[0].startswith("attnseg: error:") and message in err[0]
    assert not (tmp_path / "out" / "report.json").exists()


def test_a_result_of_another_image_is_refused_in_one_line(hippocampus_dir, tmp_path, capsys):
    assert run_main(capsys, "segment", "-i", str(SAMPLE_IMAGE), "-o", str(tmp_path / "auto"))[0] == 0
    other = hippocampus_dir / "imagesTr" / "hippocampus_003.nii.gz"
    status, _, err = run_main(capsys, "refine", "-i", str(other), "-r", str(tmp_path / "auto"),
                              "--click", "-10,-20,15,Anterior", "-o", str(tmp_path / "out"))
    assert status == 2 and len(err) == 1 and "does not match the image" in err[0]
    status, _, err = run_main(capsys, "refine", "-i", str(SAMPLE_IMAGE), "-r", str(tmp_path),
                              "--click", "-10,-20,15,Anterior", "-o", str(tmp_path / "out"))
    assert status == 2 and len(err) == 1 and "not a complete AttnSeg result" in err[0]


def test_a_whole_head_result_is_refined_with_its_own_classes_in_the_box_a_click_falls_in(data_dir, tmp_path, capsys):
    """``attnseg refine`` on a localised whole head (MNI152): the result's five classes (background and
    each side's anterior and posterior hippocampus), one click at the most doubtful voxel of the left box
    for its runner-up left class: that class wins there, nothing farther than 15 mm moves, the five
    channels are written back; the same class clicked in the right box is refused in one line."""
    head = data_dir / "mni152" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    auto, out = tmp_path / "auto", tmp_path / "refined"
    assert run_main(capsys, "segment", "-i", str(head), "-o", str(auto))[0] == 0
    report = json.loads((auto / "report.json").read_text())
    names = [c["name"] for c in report["classes"]]
    assert len(names) == 5 and names[1] == "Left anterior hippocampus"
    geometry = read_image(auto / "labels.nii.gz").geometry
    labels = read_image(auto / "labels.nii.gz").array
    probabilities = Image.from_sitk(sitk.ReadImage(str(auto / "probabilities.nii.gz"))).array  # (C, D, H, W)
    uncertainty = read_image(auto / "maps" / "uncertainty.nii.gz").array
    left = [i for i, c in enumerate(report["classes"]) if c.get("side") == "Left"]
    doubtful = np.where(np.isin(labels, [0, *left]) & probabilities[left].sum(axis=0).astype(bool), uncertainty, -1)
    voxel = np.unravel_index(int(doubtful.argmax()), labels.shape)
    label = max((k for k in left if k != labels[voxel]), key=lambda k: probabilities[(k, *voxel)])
    x, y, z = voxel_click(voxel, label, geometry).position_lps
    status, printed, err = run_main(capsys, "refine", "-i", str(head), "-r", str(auto),
                                    "--click", f"{x},{y},{z},{names[label]}", "-o", str(out))
    assert status == 0 and err == [] and "learned" in printed, (printed, err)
    seconds = float(re.search(r"in ([\d.]+) s", printed).group(1))
    refined = read_image(out / "labels.nii.gz").array
    assert refined[voxel] == label
    assert Image.from_sitk(sitk.ReadImage(str(out / "probabilities.nii.gz"))).array.shape[0] == 5
    changed = refined != labels
    assert changed.any()
    far = distances_mm(labels.shape, voxel, np.asarray(geometry.spacing)[::-1]) > RADIUS_MM
    assert not changed[far].any()
    assert json.loads((out / "report.json").read_text())["refinement"]["clicks"] == [
        {"position_lps": [x, y, z], "class": names[label]}]
    mirrored = f"{-x},{y},{z},{names[label]}"  # the MNI152 template is symmetric: the right hippocampus
    status, _, err = run_main(capsys, "refine", "-i", str(head), "-r", str(auto), "--click", mirrored,
                              "-o", str(tmp_path / "wrong"))
    assert status == 2 and len(err) == 1 and "falls in the box of the right hippocampus" in err[0], err
    print(f"whole-head click: {seconds:.2f} s")


def test_quick_interactive_benchmark_reports_the_curve_and_locality(data_dir):
    """``benchmarks/interactive.py --quick --json`` on two validation cases: its last line carries the
    Dice-by-clicks curve, clicks to 0.90 and seconds per click of the shipped method, and every
    method's refinements stayed within 15 mm of their clicks."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "interactive.py"), "--quick", "--json",
                           "--cases", "2", "--clicks", "5"], capture_output=True, text=True,
                          env={**os.environ, "ATTNSEG_DATA": str(data_dir)}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["default_method"] == "learned" and report["cases"] == 2
    assert set(report["methods"]) == set(METHODS)
    assert len(report["dice_by_clicks"]["mean"]) == 6 and set(report["clicks_to_90"]) == {"Anterior", "Posterior"}
    assert report["seconds_per_click_median"] > 0
    assert all(m["far_changed_voxels"] == 0 and m["clicks_made"] > 0 for m in report["methods"].values())


def test_training_examples_align_image_clicks_and_target(sample, package):
    """``training.refine_train.make_example`` on the real sample with the shipped refinement network:
    the click maps peak exactly where the expert label holds the clicked class (after the simulated
    rounds and the random mirror), and the channels are image, probabilities, click maps."""
    from AttnSegLib.refine import LearnedUpdate
    from training.refine_train import Sample, make_example

    image, truth, result = sample
    case = Sample("hippocampus_001", image.array[None].astype(np.float32), truth.astype(np.uint8),
                  image.geometry, {"default": result.probabilities.array.astype(np.float16)})
    updater = LearnedUpdate.from_package(find_refinement_package(package.card))
    rng = np.random.default_rng(0)
    for _ in range(3):
        x, y, weight = make_example(case, updater, rng)
        size = updater.size
        assert x.shape == (1, 7, size, size, size) and y.shape == weight.shape == (1,) + (size,) * 3
        assert weight[0, size // 2, size // 2, size // 2] >= 1.0 and weight.min() >= 0.0
        assert torch.allclose(x[0, 1:4].sum(dim=0), torch.ones(()), atol=1e-3)
        for label in range(3):
            peaks = x[0, 4 + label] == 1.0
            assert torch.all(y[0][peaks] == label)
        assert (x[0, 4:] == 1.0).any()
