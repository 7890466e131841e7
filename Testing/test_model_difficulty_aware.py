"""difficulty_aware (Nie et al., AAAI 2019): blocks and losses against their equations, shapes, map
ranges, where each training step's gradients go, and alternating training on a real hippocampus patch."""
from __future__ import annotations

import math

import pytest
import torch
from monai.losses import GeneralizedDiceLoss
from real_patch import labelled_patch

from AttnSegLib import models
from AttnSegLib.package import PackageError, build_from_card, load_package
from AttnSegLib.models.blocks import SqueezeExcitation
from AttnSegLib.models.difficulty_aware import ConfidenceNetwork, difficulty_map
from training.losses import build_difficulty_aware_loss
from training.losses.difficulty_aware import (
    batch_class_dice,
    difficulty_aware_hybrid_loss,
    generalized_dice_loss,
    hybrid_loss,
    one_hot,
    organ_difficulty_weights,
    weighted_cross_entropy,
)

# A tiny case worked by hand: 2 classes, 4 voxels. Class-1 logits ln3, -ln3, 0, ln3 against class-0
# logits 0 give p1 = 0.75, 0.25, 0.5, 0.75; labels 1, 0, 1, 1.
TINY_LOGITS = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3), -math.log(3), 0.0, math.log(3)]]).view(1, 2, 1, 1, 4)
TINY_LABELS = torch.tensor([1, 0, 1, 1]).view(1, 1, 1, 4)
# -log p[y] per voxel: -log .75, -log .75, -log .5, -log .75
TINY_VOXEL_CE = [-math.log(0.75), -math.log(0.75), -math.log(0.5), -math.log(0.75)]


def test_squeeze_excitation_follows_hu_et_al():
    torch.manual_seed(0)
    block = SqueezeExcitation(6, reduction=2, min_hidden=1)
    x = torch.randn(2, 6, 3, 4, 5)
    w1, b1 = block.excite[0].weight.flatten(1), block.excite[0].bias
    w2, b2 = block.excite[2].weight.flatten(1), block.excite[2].bias
    squeezed = x.mean(dim=(2, 3, 4))                                       # (N, C)
    weights = torch.sigmoid(torch.relu(squeezed @ w1.T + b1) @ w2.T + b2)  # (N, C)
    assert w1.shape == (3, 6)
    torch.testing.assert_close(block.channel_weights(x), weights)
    torch.testing.assert_close(block(x), x * weights[:, :, None, None, None])


def test_difficulty_is_one_minus_confidence_to_the_beta():
    confidence = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    torch.testing.assert_close(difficulty_map(confidence, 2.0), torch.tensor([1.0, 0.5625, 0.25, 0.01, 0.0]))
    torch.testing.assert_close(difficulty_map(confidence, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.1, 0.0]))
    torch.testing.assert_close(difficulty_map(confidence, 0.0), torch.ones(5))


def test_organ_weights_are_one_minus_dice_to_the_gamma():
    dice = torch.tensor([0.9, 0.5, 0.0, 1.0])
    torch.testing.assert_close(organ_difficulty_weights(dice, 2.0), torch.tensor([0.01, 0.25, 1.0, 0.0]))
    torch.testing.assert_close(organ_difficulty_weights(dice, 0.0), torch.ones(4))


def test_hybrid_loss_by_hand():
    # pi = 1/count^2: class 0 (1 voxel) 1, class 1 (3 voxels) 1/9.
    # intersections: class 0 0.75, class 1 0.75 + 0.5 + 0.75 = 2.0
    # sums P + P_hat: class 0 1 + 1.75 = 2.75, class 1 3 + 2.25 = 5.25
    dice = 2 * (1 * 0.75 + 2.0 / 9) / (1 * 2.75 + 5.25 / 9)                  # = 0.58333
    cross_entropy = sum(TINY_VOXEL_CE) / 4                                    # = 0.38905
    assert hybrid_loss(TINY_LOGITS, TINY_LABELS).item() == pytest.approx(1 - dice + cross_entropy, abs=1e-5)


def test_generalized_dice_matches_monai():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6)
    labels = torch.randint(0, 3, (2, 4, 5, 6))
    reference = GeneralizedDiceLoss(to_onehot_y=True, softmax=True, smooth_nr=0.0, smooth_dr=0.0)
    ours = generalized_dice_loss(torch.softmax(logits, 1), one_hot(labels, 3))
    torch.testing.assert_close(ours, reference(logits, labels[:, None]), atol=1e-5, rtol=0)


def test_focal_dice_weights_select_classes():
    # organ weights (0, 1): the Dice of class 1 alone, 2 * 2.0 / 5.25; (1, 0): class 0, 2 * .75 / 2.75
    difficulty = torch.ones(1, 1, 1, 1, 4)
    fdice, _ = difficulty_aware_hybrid_loss(TINY_LOGITS, TINY_LABELS, difficulty, torch.tensor([0.0, 1.0]))
    assert fdice.item() == pytest.approx(1 - 4.0 / 5.25, abs=1e-5)
    fdice, _ = difficulty_aware_hybrid_loss(TINY_LOGITS, TINY_LABELS, difficulty, torch.tensor([1.0, 0.0]))
    assert fdice.item() == pytest.approx(1 - 1.5 / 2.75, abs=1e-5)
    # perfect classes (weight 0 everywhere) contribute nothing
    fdice, _ = difficulty_aware_hybrid_loss(TINY_LOGITS, TINY_LABELS, difficulty, torch.zeros(2))
    assert fdice.item() == pytest.approx(0.0, abs=1e-6)


def test_difficulty_aware_cross_entropy_weights_each_voxel():
    difficulty = torch.tensor([1.0, 0.0, 0.5, 0.25]).view(1, 1, 1, 1, 4)
    expected = sum(f * ce for f, ce in zip([1.0, 0.0, 0.5, 0.25], TINY_VOXEL_CE)) / 4
    assert weighted_cross_entropy(TINY_LOGITS, TINY_LABELS, difficulty).item() == pytest.approx(expected, abs=1e-6)
    assert weighted_cross_entropy(TINY_LOGITS, TINY_LABELS).item() == pytest.approx(sum(TINY_VOXEL_CE) / 4, abs=1e-6)


def test_class_dice_of_the_argmax_by_hand():
    # predicted 1, 0, 0, 1 against 1, 0, 1, 1 (case 1) and a perfect case 2; class 2 absent -> 1
    logits = torch.tensor([[0.0, 0, 5, 0], [5.0, -5, -5, 5], [-9.0, -9, -9, -9]]).view(1, 3, 1, 1, 4)
    logits = torch.cat([logits, torch.tensor([[0.0, 5, 0, 0], [5.0, -5, 5, 5], [-9.0, -9, -9, -9]]).view(1, 3, 1, 1, 4)])
    labels = torch.tensor([[1, 0, 1, 1], [1, 0, 1, 1]]).view(2, 1, 1, 4)
    # case 1: class 0 2*1/(2+1) = 2/3, class 1 2*2/(2+3) = 0.8; case 2: 1, 1
    torch.testing.assert_close(batch_class_dice(logits, labels), torch.tensor([(2 / 3 + 1) / 2, 0.9, 1.0]))


@pytest.mark.parametrize("modalities, classes, size, depth", [
    (1, 3, (24, 40, 56), 4),   # odd multiples of the divisor 8
    (4, 2, (8, 24, 40), 4),
    (2, 5, (12, 20, 28), 3),   # divisor 4
])
def test_shapes_in_training_and_inference(modalities, classes, size, depth):
    torch.manual_seed(0)
    net = models.build("difficulty_aware", modalities, classes, base_features=4, depth=depth)
    assert net.divisor == 2 ** (depth - 1)
    x = torch.randn(1, modalities, *size)
    out = net.train()(x)
    assert out.logits.shape == (1, classes, *size)
    assert out.maps["confidence"].shape == out.maps["difficulty"].shape == (1, 1, *size)
    assert out.aux["confidence_logits"].shape == (1, 1, *size)
    assert out.aux["deep_supervision.1"].shape == (1, classes, *(s // 2 for s in size))
    assert out.aux["deep_supervision.2"].shape == (1, classes, *(s // 4 for s in size))
    with torch.no_grad():
        out = net.eval()(x)
    assert out.aux == {} and set(out.maps) == set(net.map_descriptions()) == {"confidence", "difficulty"}


def test_maps_are_confidence_and_its_difficulty():
    torch.manual_seed(1)
    net = models.build("difficulty_aware", 1, 3, base_features=4, beta=3.0).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, 16, 24, 16))
    confidence, difficulty = out.maps["confidence"], out.maps["difficulty"]
    assert 0 <= confidence.min() and confidence.max() <= 1 and confidence.std() > 0
    torch.testing.assert_close(difficulty, (1 - confidence) ** 3)


def test_segment_is_the_segmenter_alone():
    """``segment`` gives forward's logits without running the confidence network (a map-only head)."""
    torch.manual_seed(2)
    net = models.build("difficulty_aware", 1, 3, base_features=4).eval()
    x = torch.randn(1, 1, 16, 24, 16)
    calls = []
    hook = net.confidence_net.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        logits = net.segment(x)
        assert calls == []
        torch.testing.assert_close(logits, net(x).logits, rtol=0, atol=0)
    hook.remove()
    assert calls == [1]
    with pytest.raises(ValueError, match="divisible by 8"):
        net.segment(torch.randn(1, 1, 12, 24, 16))


def test_maps_from_probabilities_are_forwards_maps():
    """D alone on S's probabilities gives forward's maps: the predictor may run it once on the blended result."""
    torch.manual_seed(3)
    net = models.build("difficulty_aware", 1, 3, base_features=4).eval()
    x = torch.randn(2, 1, 16, 24, 16)
    with torch.no_grad():
        out = net(x)
        maps = net.maps_from_probabilities(torch.softmax(net.segment(x), dim=1), x)
    assert net.maps_from_probabilities_only and set(maps) == set(out.maps)
    for name in maps:
        torch.testing.assert_close(maps[name], out.maps[name])


def test_a_coarse_confidence_network_skips_the_full_resolution_level():
    """``coarse_confidence``: D's convolutions start at half resolution, its maps keep the input's size, and
    with its U-Net head at zero its confidence is the largest class probability (the per-voxel term at
    a = 1, b = 0) wherever that is inside [eps, 1 - eps]."""
    torch.manual_seed(4)
    net = models.build("difficulty_aware", 1, 3, base_features=4, coarse_confidence=True).eval()
    paper = models.build("difficulty_aware", 1, 3, base_features=4).eval()
    assert [b[0].stride for b in net.confidence_net.encoder] == [(2, 2, 2)] * 3
    assert [b[0].out_channels for b in net.confidence_net.encoder] == [4, 8, 16]
    assert [b[0].out_channels for b in paper.confidence_net.encoder] == [2, 4, 8, 16]
    x = torch.randn(2, 1, 16, 24, 16)
    with torch.no_grad():
        probabilities = torch.softmax(net.segment(x), dim=1)
        assert net(x).maps["confidence"].shape == (2, 1, 16, 24, 16)
        torch.nn.init.zeros_(net.confidence_net.head.weight)
        torch.nn.init.zeros_(net.confidence_net.head.bias)
        maps = net.maps_from_probabilities(probabilities, x)
    torch.testing.assert_close(maps["confidence"], probabilities.amax(1, keepdim=True))
    with pytest.raises(ValueError, match="num_classes"):
        ConfidenceNetwork(4, [4, 8], coarse=True)


@pytest.mark.parametrize("value", ["false", "true", 0, None])
def test_a_card_whose_coarse_confidence_is_not_a_boolean_is_refused(value):
    """A hand-edited card's "false" is a non-empty string: taken as truthy it built the coarse D, and a
    package with the paper's D then failed on its weights' shapes instead of on the card's value."""
    card = load_package("hippocampus_difficulty_aware").card.to_dict()
    card["architecture"]["kwargs"]["coarse_confidence"] = value
    with pytest.raises(PackageError, match="coarse_confidence must be true or false"):
        build_from_card(card)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="depth must be at least 3"):
        models.build("difficulty_aware", 1, 3, depth=2)
    with pytest.raises(ValueError, match="beta"):
        models.build("difficulty_aware", 1, 3, beta=-1)
    with pytest.raises(ValueError, match="divisible by 8"):
        models.build("difficulty_aware", 1, 3)(torch.randn(1, 1, 12, 16, 16))
    with pytest.raises(ValueError, match="model.train"):
        net = models.build("difficulty_aware", 1, 3, base_features=4).eval()
        build_difficulty_aware_loss().segmenter(net(torch.randn(1, 1, 16, 16, 16)), torch.zeros(1, 16, 16, 16, dtype=torch.long))


def _grads(module):
    return {name: p.grad for name, p in module.named_parameters()}


def test_each_step_trains_its_own_network():
    torch.manual_seed(0)
    net = models.build("difficulty_aware", 2, 3, base_features=4).train()
    losses = build_difficulty_aware_loss()
    x, y = torch.randn(2, 2, 16, 16, 8), torch.randint(0, 3, (2, 16, 16, 8))

    out = net(x)
    losses.segmenter(out, y)[0].backward()
    missing = [n for n, g in _grads(net.segmenter).items() if g is None or not torch.isfinite(g).all() or not g.any()]
    assert not missing, f"segmenter parameters without gradient: {missing}"
    assert all(g is not None for g in _grads(net.confidence_net).values())  # L_ADV runs through D

    net.zero_grad(set_to_none=True)
    losses.confidence(out, y, model=net, image=x)[0].backward()
    missing = [n for n, g in _grads(net.confidence_net).items() if g is None or not torch.isfinite(g).all() or not g.any()]
    assert not missing, f"confidence-network parameters without gradient: {missing}"
    assert all(g is None for g in _grads(net.segmenter).values()), "the confidence step must not train S"

    # F = (1 - M)^beta only weights the loss: without L_ADV, D receives nothing from the segmenter step
    net.zero_grad(set_to_none=True)
    build_difficulty_aware_loss(lambda_adv=0.0).segmenter(net(x), y)[0].backward()
    assert all(g is None or not g.any() for g in _grads(net.confidence_net).values())


def test_alternating_training_fits_a_real_patch(hippocampus_case):
    torch.manual_seed(0)
    x, y = labelled_patch(*hippocampus_case, size=(24, 40, 24))
    assert set(y.unique().tolist()) == {0, 1, 2}
    net = models.build("difficulty_aware", 1, 3, base_features=6).train()
    losses = build_difficulty_aware_loss()
    optimise_s = torch.optim.Adam(net.segmenter.parameters(), lr=5e-3)    # the paper's rates
    optimise_d = torch.optim.Adam(net.confidence_net.parameters(), lr=5e-3)
    history = []
    for _ in range(30):
        optimise_s.zero_grad()
        out = net(x)
        segmenter, parts = losses.segmenter(out, y)
        segmenter.backward()
        optimise_s.step()
        optimise_d.zero_grad()
        confidence, _ = losses.confidence(out, y, model=net, image=x)
        confidence.backward()
        optimise_d.step()
        history.append((segmenter.item(), parts["fdice.0"].item(), parts["fce.0"].item(), confidence.item()))
    first, last = history[0], history[-1]
    assert last[0] < 0.6 * first[0], history
    assert last[1] < first[1] and last[2] < first[2], history
    assert sum(h[3] for h in history[-3:]) / 3 < first[3] - 0.03, history  # D learns to tell label from prediction
