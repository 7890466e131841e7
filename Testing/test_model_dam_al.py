"""DAM-AL: spatial attention (Eq. 1), channel attention on atrous features (Eq. 2), the surface
weight map (Eq. 6), the hard-case attention loss (Eq. 7), and a real fit on a hippocampus patch."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from real_patch import fit, labelled_patch
from scipy.spatial.distance import cdist

from AttnSegLib import models
from AttnSegLib.models.blocks import FactorisedSpatialAttention
from AttnSegLib.models.dam_al import surface_weight_map
from training.losses import build_dam_al_loss
from training.losses.dam_al import hard_case_attention_loss

SMALL = dict(features=(4, 8, 8, 16, 16), spatial_kernel=5, atrous_features=4, fuse_features=8)


def test_spatial_attention_is_eq1_with_the_six_factorised_kernels():
    torch.manual_seed(0)
    block = FactorisedSpatialAttention(4, kernel_size=5).eval()
    kernels = [tuple(m.kernel_size) for m in block.modules() if isinstance(m, torch.nn.Conv3d)]
    assert kernels == [(1, 5, 5), (5, 1, 1), (5, 1, 5), (1, 5, 1), (5, 5, 1), (1, 1, 5)]

    x = torch.randn(2, 4, 6, 7, 8)
    logits = 0
    for branch in block.branches:  # F_1, F_2, F_3 by hand: conv (same padding), instance norm, leaky ReLU, conv
        first, norm, _ = branch[0]
        second = branch[1]
        h = F.conv3d(x, first.weight, padding=tuple(k // 2 for k in first.kernel_size))
        h = F.leaky_relu(F.instance_norm(h, weight=norm.weight, bias=norm.bias), 0.01)
        logits = logits + F.conv3d(h, second.weight, second.bias, padding=tuple(k // 2 for k in second.kernel_size))
    f_sa = torch.sigmoid(logits)
    out, attention = block(x)
    torch.testing.assert_close(attention, f_sa)
    torch.testing.assert_close(out, f_sa * x)
    assert attention.shape == (2, 1, 6, 7, 8)


def test_each_kernel_pair_spans_the_full_k_cube():
    """With a pointwise norm (batch norm in eval), the attention at one voxel depends on exactly the
    KxKxK cube around it: each pair (plane conv, orthogonal line conv) covers it."""
    torch.manual_seed(0)
    block = FactorisedSpatialAttention(3, kernel_size=3, norm="batch").eval()
    x = torch.randn(1, 3, 7, 7, 7, requires_grad=True)
    _, attention = block(x)
    attention[0, 0, 3, 3, 3].backward()
    support = x.grad.abs().sum(1)[0] > 0
    expected = torch.zeros(7, 7, 7, dtype=torch.bool)
    expected[2:5, 2:5, 2:5] = True
    assert torch.equal(support, expected)


def _brute_force_surface_weights(label: np.ndarray, num_classes: int, spacing) -> np.ndarray:
    """Eq. 6 straight from its definition: surface voxels by comparing each voxel with its six face
    neighbours (the array edge repeats the border, so it is no surface), then the minimum distance
    over all surface voxels."""
    padded = np.pad(label, 1, mode="edge")
    d, h, w = label.shape
    coords = np.argwhere(np.ones_like(label, dtype=bool)) * np.asarray(spacing)
    weights = np.ones((num_classes, *label.shape))
    for c in range(num_classes):
        surface = []
        for z, y, x in itertools.product(range(d), range(h), range(w)):
            if label[z, y, x] != c:
                continue
            neighbours = [padded[z + 1 + dz, y + 1 + dy, x + 1 + dx]
                          for dz, dy, dx in [(-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)]]
            if any(n != c for n in neighbours):
                surface.append((z, y, x))
        if surface:
            nearest = cdist(coords, np.asarray(surface) * np.asarray(spacing)).min(1)
            weights[c] = (1.0 / (nearest + 1.0)).reshape(label.shape)
    return weights


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5)])
def test_surface_weight_map_matches_eq6_computed_by_brute_force(spacing):
    rng = np.random.default_rng(3)
    label = np.zeros((7, 9, 8), dtype=np.int64)
    label[1:5, 2:7, 1:6] = 1
    label[3:6, 4:8, 4:8] = 2
    label[rng.random(label.shape) < 0.05] = 1          # a few isolated voxels: surfaces everywhere
    expected = _brute_force_surface_weights(label, 4, spacing)   # class 3 absent
    weights = surface_weight_map(label, 4, spacing=None if spacing == (1.0, 1.0, 1.0) else spacing)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert weights.shape == (4, 7, 9, 8) and weights.dtype == np.float32
    assert (weights[3] == 1).all()


def test_surface_weight_map_of_a_real_label(hippocampus_case):
    _, label = labelled_patch(*hippocampus_case, (32, 48, 32))
    weights = surface_weight_map(label[0].numpy(), 3)
    assert weights.min() > 0 and weights.max() == 1
    for c in (1, 2):
        mask = label[0].numpy() == c
        inner = mask & (weights[c] < 1)
        assert inner.any() and (weights[c][mask] == 1).any()       # surface at 1, the inside decays
        assert weights[c][~mask].max() <= 0.5                       # one voxel off the surface: 1/2


def test_hard_case_attention_loss_by_hand():
    """Eq. 7 case by case on two voxels, three classes, background left out."""
    probabilities = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]).T.reshape(1, 3, 2, 1, 1)
    target = torch.tensor([1, 2]).reshape(1, 2, 1, 1)
    weights = torch.tensor([[9.0, 9.0], [1.0, 0.5], [0.25, 1.0]]).reshape(1, 3, 2, 1, 1)
    # voxel 0 (class 1): W^1 (1 - 0.5)^2 + W^2 0.3^2;  voxel 1 (class 2): W^1 0.1^2 + W^2 (1 - 0.8)^2
    numerator = 1.0 * 0.25 + 0.25 * 0.09 + 0.5 * 0.01 + 1.0 * 0.04
    expected = numerator / (1.0 + 0.25 + 0.5 + 1.0)
    loss = hard_case_attention_loss(probabilities, target, weights)
    assert loss.item() == pytest.approx(expected)
    with_background = numerator + 9.0 * 0.2 ** 2 + 9.0 * 0.1 ** 2
    assert hard_case_attention_loss(probabilities, target, weights, include_background=True).item() == \
        pytest.approx(with_background / (1.0 + 0.25 + 0.5 + 1.0 + 18.0))


@pytest.mark.parametrize("modalities, classes", [(1, 3), (2, 4), (4, 2)])
def test_shapes_and_map_ranges(modalities, classes):
    torch.manual_seed(0)
    net = models.build("dam_al", modalities, classes, **SMALL).eval()
    assert net.divisor == 16
    size = (48, 16, 80)                                             # odd multiples of 16
    with torch.no_grad():
        out = net(torch.randn(2, modalities, *size))
    assert out.logits.shape == (2, classes, *size)
    assert out.maps["spatial_attention.level1"].shape == (2, 1, 48, 16, 80)
    assert out.maps["spatial_attention.level2"].shape == (2, 1, 24, 8, 40)
    for a in out.maps.values():
        assert 0 < a.min() and a.max() < 1
    assert out.aux == {}
    weights = net.last_channel_weights()
    assert set(weights) == {"channel_weights.level3", "channel_weights.level4", "channel_weights.level5"}
    for w in weights.values():
        assert w.shape == (2, 16) and 0 < w.min() and w.max() < 1


def test_depth_follows_features_and_bad_sizes_are_refused():
    net = models.build("dam_al", 1, 3, features=(4, 8, 8), atrous_features=2, fuse_features=4)
    assert net.divisor == 4
    out = net.train()(torch.randn(1, 1, 12, 20, 8))
    assert set(out.aux) == {"channel_weights.level3"}
    with pytest.raises(ValueError, match="at least 3 levels"):
        models.build("dam_al", 1, 3, features=(4, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 1, 12, 20, 10))


def test_loss_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = models.build("dam_al", 2, 3, **SMALL).train()
    target = torch.zeros(2, 32, 16, 16, dtype=torch.long)
    target[:, 8:20, 4:12, 4:10] = 1
    target[:, 14:26, 6:14, 8:14] = 2
    loss, parts = build_dam_al_loss()(net(torch.randn(2, 2, 32, 16, 16)), target)
    loss.backward()
    assert set(parts) == {"dice", "attention", "total"}
    silent = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent


def test_fitting_a_real_patch_lowers_both_terms(hippocampus_case):
    torch.manual_seed(0)
    x, y = labelled_patch(*hippocampus_case, (32, 48, 32))
    net = models.build("dam_al", 1, 3, **SMALL).train()
    loss_fn = build_dam_al_loss()
    history = fit(net, lambda _: loss_fn(net(x), y), steps=20, lr=1e-2)
    first, last = history[0], history[-1]
    assert last["total"] < 0.6 * first["total"]
    assert last["attention"] < 0.6 * first["attention"]
    assert last["dice"] < first["dice"]
