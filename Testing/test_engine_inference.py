"""The Predictor on a real hippocampus case: grid, progress, cancel, determinism, maps, TTA."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from AttnSegLib import models
from AttnSegLib.image import read_image
from AttnSegLib.inference import Cancelled, Predictor, count_windows, lone_window, resolve_device
from AttnSegLib.maps import normalized_entropy
from AttnSegLib.package import available_packages, load_package

CLASSES = [{"value": 0, "name": "background"}, {"value": 1, "name": "Anterior"},
           {"value": 2, "name": "Posterior"}]


def card_for(name: str, **kwargs) -> dict:
    return {"name": f"test_{name}", "architecture": {"name": name, "kwargs": kwargs},
            "modalities": [{"name": "T1", "normalization": "zscore"}], "classes": CLASSES,
            "patch_size_dhw": [16, 32, 16], "spacing_xyz_mm": [1.0, 1.0, 1.0], "orientation": "RAS",
            "inference": {"overlap": 0.5, "batch_size": 2}}


@pytest.fixture(scope="module")
def unet_predictor():
    torch.manual_seed(0)
    return Predictor(models.build("unet", 1, 3, features=[4, 8]), card=card_for("unet", features=[4, 8]),
                     device="cpu")


def test_result_is_on_the_input_grid(unet_predictor, hippocampus_case):
    image = read_image(hippocampus_case[0])
    result = unet_predictor.predict([image])
    assert result.labels.geometry == image.geometry
    assert result.labels.array.shape == image.array.shape and result.labels.array.dtype == np.uint8
    assert result.probabilities.array.shape == (3, *image.array.shape)
    np.testing.assert_allclose(result.probabilities.array.sum(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(result.labels.array, result.probabilities.array.argmax(0))
    assert set(result.maps) == {"uncertainty"} and result.review_map_name == "uncertainty"
    assert result.provenance["device"] == "cpu" and result.provenance["versions"]["torch"]


def test_progress_reaches_one_with_an_eta(unet_predictor, hippocampus_case):
    calls = []
    unet_predictor.predict([read_image(hippocampus_case[0])], progress=lambda f, eta, stage: calls.append((f, eta, stage)))
    predict = [c for c in calls if c[2] == "predict"]
    windows = count_windows((35, 51, 35)[::-1], (16, 32, 16), 0.5)
    assert len(predict) == -(-windows // 2)  # one call per batch of two windows
    fractions = [c[0] for c in predict]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(eta is not None and eta >= 0 for _, eta, _ in predict)


def test_cancel_stops_between_windows(unet_predictor, hippocampus_case):
    cancel = threading.Event()
    seen = []

    def progress(fraction, eta, stage):
        seen.append(fraction)
        if len(seen) == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        unet_predictor.predict([read_image(hippocampus_case[0])], progress=progress, cancel=cancel)
    assert len(seen) == 2 and seen[-1] < 1.0


def test_deterministic_on_the_same_device(unet_predictor, hippocampus_case):
    image = read_image(hippocampus_case[0])
    a = unet_predictor.predict([image]).probabilities.array
    b = unet_predictor.predict([image]).probabilities.array
    np.testing.assert_array_equal(a, b)


def test_flip_tta_averages_the_mirrored_passes(hippocampus_case):
    torch.manual_seed(0)
    net = models.build("unet", 1, 3, features=[4, 8])
    image = read_image(hippocampus_case[0])
    plain = Predictor(net, card=card_for("unet", features=[4, 8]), device="cpu").predict([image])
    tta = Predictor(net, card=card_for("unet", features=[4, 8]), device="cpu", tta=True).predict([image])
    assert tta.provenance["tta"] is True and tta.provenance["tta_flips"] == 8
    card = card_for("unet", features=[4, 8])
    card["inference"]["tta_flip_axes"] = [2]  # left-right only: 2 passes
    assert Predictor(net, card=card, device="cpu", tta=True).flips == [(), (4,)]
    assert not np.allclose(plain.probabilities.array, tta.probabilities.array)
    np.testing.assert_allclose(tta.probabilities.array.sum(0), 1.0, atol=1e-4)


@pytest.mark.parametrize("name", models.names())
def test_every_architecture_gives_its_maps_on_the_input_grid(name, hippocampus_case):
    torch.manual_seed(0)
    net = models.build(name, 1, 3)
    card = card_for(name)
    card["patch_size_dhw"] = [max(16, 2 * net.divisor)] * 3  # instance norm needs > 1 voxel at the bottleneck
    image = read_image(hippocampus_case[0])
    result = Predictor(net, card=card, device="cpu").predict([image])
    described = set(net.map_descriptions())
    produced = set(result.maps) - {"uncertainty"}

    def describes(description: str, key: str) -> bool:  # a multi-channel map is written one volume per channel
        return key == description or key.startswith(description + ".")

    assert all(any(describes(d, key) for d in described) for key in produced), f"{name}: undescribed {produced}"
    assert all(any(describes(d, key) for key in produced) for d in described), f"{name}: missing {described}"
    for key, volume in result.maps.items():
        assert volume.geometry == image.geometry, key
        assert np.isfinite(volume.array).all(), key
    no_maps = Predictor(net, card=card, device="cpu", with_maps=False).predict([image])
    assert set(no_maps.maps) == {"uncertainty"}


def test_normalized_entropy_by_hand():
    p = np.array([[1.0, 0.5, 1 / 3], [0.0, 0.5, 1 / 3], [0.0, 0.0, 1 / 3]], dtype=np.float32)[..., None, None]
    h = normalized_entropy(p)[:, 0, 0]
    np.testing.assert_allclose(h, [0.0, np.log(2) / np.log(3), 1.0], atol=1e-5)


def test_unavailable_devices_are_explained():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


def test_review_map_follows_the_card(hippocampus_case):
    """The card's ``inference.review_map`` (chosen at export by measured error detection) ranks the
    review; without it a model's own difficulty map does."""
    torch.manual_seed(0)
    net = models.build("difficulty_aware", 1, 3)
    card = card_for("difficulty_aware")
    card["patch_size_dhw"] = [2 * net.divisor] * 3
    image = read_image(hippocampus_case[0])
    assert Predictor(net, card=card, device="cpu").predict([image]).review_map_name == "difficulty"
    card["inference"]["review_map"] = "uncertainty"
    assert Predictor(net, card=card, device="cpu").predict([image]).review_map_name == "uncertainty"


@pytest.fixture(scope="module")
def shipped_difficulty_aware():
    return load_package(Path(__file__).resolve().parents[1] / "Resources" / "Models" / "hippocampus_difficulty_aware")


def test_without_maps_the_confidence_network_never_runs(shipped_difficulty_aware, hippocampus_case):
    """The shipped difficulty-aware package on a real case: with maps off its confidence network (a
    map-only head) is not called once, and the probabilities are those of the run with maps."""
    image = read_image(hippocampus_case[0])
    runs = {}
    for with_maps in (True, False):
        predictor = Predictor(shipped_difficulty_aware, device="cpu", with_maps=with_maps)
        calls = []
        hook = predictor.network.confidence_net.register_forward_hook(lambda *_: calls.append(1))
        try:
            runs[with_maps] = (predictor.predict([image]), len(calls))
        finally:
            hook.remove()
    (with_maps, d_calls), (without, no_calls) = runs[True], runs[False]
    assert d_calls >= 1 and no_calls == 0
    assert "difficulty" in with_maps.maps and set(without.maps) == {"uncertainty"}
    np.testing.assert_array_equal(with_maps.probabilities.array, without.probabilities.array)
    np.testing.assert_array_equal(with_maps.labels.array, without.labels.array)


def test_the_confidence_network_runs_once_per_voxel_on_the_blended_result(shipped_difficulty_aware,
                                                                          hippocampus_case):
    """The shipped difficulty-aware package on a real case cut into many overlapping windows: the segmenter
    runs on every window, the confidence network once on each window of a tiling that does not overlap."""
    image = read_image(hippocampus_case[0])
    card = {**shipped_difficulty_aware.card, "patch_size_dhw": [16, 24, 16]}
    predictor = Predictor(shipped_difficulty_aware.build_network(), card=card, device="cpu", batch_size=1,
                          localise=False)
    calls = {"segmenter": 0, "confidence_net": 0}
    hooks = [getattr(predictor.network, name).register_forward_hook(
        lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)) for name in calls]
    try:
        result = predictor.predict([image])
    finally:
        for hook in hooks:
            hook.remove()
    size = result.labels.array.shape  # RAS input: the model frame is the input grid
    assert calls["segmenter"] == count_windows(size, card["patch_size_dhw"], predictor.overlap)
    assert calls["confidence_net"] == np.prod([-(-s // p) for s, p in zip(size, card["patch_size_dhw"])])
    assert calls["confidence_net"] < calls["segmenter"] / 2
    confidence = result.maps["confidence"].array
    assert confidence.shape == size and 0 <= confidence.min() and confidence.max() <= 1 and confidence.std() > 0


def test_one_window_gives_the_per_window_maps(shipped_difficulty_aware, hippocampus_case):
    """Where one window covers the case, D on the blended result (the probabilities brought back from the
    card's temperature) is D on that window: the maps match the network's own forward pass."""
    image = read_image(hippocampus_case[0])
    blended = Predictor(shipped_difficulty_aware, device="cpu").predict([image])
    per_window = Predictor(shipped_difficulty_aware, device="cpu")
    per_window.network.maps_from_probabilities_only = False  # this instance: forward() on every window
    reference = per_window.predict([image])
    np.testing.assert_array_equal(blended.labels.array, reference.labels.array)
    for name in ("confidence", "difficulty"):  # they differ only in the padding around the crop
        np.testing.assert_allclose(blended.maps[name].array, reference.maps[name].array, atol=0.01)


def test_tta_variance_is_the_disagreement_of_the_flips(shipped_difficulty_aware, hippocampus_case):
    """With flips and maps the shipped package adds ``tta_variance`` in [0, 1], high where the mirrored
    passes disagree (where the averaged probabilities are uncertain), and nothing without flips or maps."""
    image = read_image(hippocampus_case[0])
    result = Predictor(shipped_difficulty_aware, device="cpu", tta=True).predict([image])
    variance = result.maps["tta_variance"].array
    assert variance.shape == result.labels.array.shape and 0 <= variance.min() and variance.max() <= 1
    doubtful = result.maps["uncertainty"].array > 0.5
    assert doubtful.any() and variance[doubtful].mean() > 10 * variance[~doubtful].mean()
    for tta, with_maps in ((False, True), (True, False)):
        other = Predictor(shipped_difficulty_aware, device="cpu", tta=tta, with_maps=with_maps).predict([image])
        assert "tta_variance" not in other.maps


@pytest.mark.parametrize("package", available_packages(), ids=lambda path: path.name)
def test_a_lone_window_gets_what_the_first_of_two_copies_gets(package):
    """Each shipped network on one window (its convolutions sent to oneDNN directly, or run on two
    copies) answers what it answers for the first of a batch of two copies of it, up to float rounding."""
    loaded = load_package(package)
    network = loaded.build_network().eval()
    torch.manual_seed(4)
    window = torch.randn(1, len(loaded.card["modalities"]), *loaded.card["patch_size_dhw"])
    with torch.inference_mode():
        two = network(torch.cat([window, window]))
        one, segmented = lone_window(network, window), lone_window(network.segment, window)
    torch.testing.assert_close(one.logits, two.logits[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(segmented, two.logits[:1], rtol=1e-5, atol=1e-5)
    assert one.maps.keys() == two.maps.keys()
    for name in one.maps:
        torch.testing.assert_close(one.maps[name], two.maps[name][:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [(2, 2, 2), (1, 2, 2), (2, 3, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_a_lone_windows_up_sampling_and_1x1x1_convolutions_are_those_of_two_copies(kernel, bias):
    """The matrix-product forms a lone window takes for a transposed convolution whose kernel is its
    stride and for a 1x1x1 convolution (with or without bias) answer what the convolutions answer for
    the first of two copies, up to float rounding, on a window whose sides differ."""
    torch.manual_seed(5)
    window = torch.randn(1, 6, 5, 7, 4)
    up = torch.nn.ConvTranspose3d(6, 3, kernel, stride=kernel, bias=bias).eval()
    pointwise = torch.nn.Conv3d(6, 4, 1, bias=bias).eval()
    with torch.inference_mode():
        for layer in (up, pointwise):
            torch.testing.assert_close(lone_window(layer, window), layer(torch.cat([window, window]))[:1],
                                       rtol=1e-5, atol=1e-6)


def test_the_cards_temperature_changes_probabilities_not_labels(shipped_difficulty_aware, hippocampus_case):
    """Temperature scaling divides the logits before the softmax: a temperature above 1 softens every
    probability (the foreground ones that were near 1 fall) but never changes the argmax."""
    image = read_image(hippocampus_case[0])
    results = {}
    for temperature in (1.0, 2.0):
        card = {**shipped_difficulty_aware.card,
                "inference": {**shipped_difficulty_aware.card["inference"], "temperature": temperature}}
        predictor = Predictor(shipped_difficulty_aware.build_network(), card=card, device="cpu", with_maps=False)
        results[temperature] = predictor.predict([image])
    sharp, soft = results[1.0], results[2.0]
    np.testing.assert_array_equal(sharp.labels.array, soft.labels.array)
    assert not np.allclose(sharp.probabilities.array, soft.probabilities.array, atol=1e-3)
    # Softer: the winning class's probability drops wherever it was confident.
    top_sharp, top_soft = sharp.probabilities.array.max(axis=0), soft.probabilities.array.max(axis=0)
    confident = top_sharp > 0.9
    assert confident.any() and np.all(top_soft[confident] < top_sharp[confident])
    assert np.mean(sharp.maps["uncertainty"].array) < np.mean(soft.maps["uncertainty"].array)
