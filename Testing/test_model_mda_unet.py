"""mda_unet (MDA-U-Net in 3D): attention blocks against explicit loops over Eq. 10-13, cascade
multi-scale convolution against Eq. 14, the dual supervision loss by hand, shapes, map ranges,
gradients, and fitting a real hippocampus patch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from real_patch import fit, labelled_patch

from AttnSegLib import models
from AttnSegLib.models.blocks import ChannelSelfAttention, DensePositionAttention
from AttnSegLib.models.mda_unet import CascadeMultiScaleConv, MultiDimensionalSelfAttention
from training.losses import build_mda_unet_loss
from training.losses.mda_unet import softmax_binary_cross_entropy


@pytest.mark.parametrize("tau", [1.0, 0.2])
def test_dense_position_attention_against_a_loop_over_eq_10_11(tau):
    """tau = 1 is the paper's softmax over voxels; tau < 1 divides its logits (sharper dense features)."""
    torch.manual_seed(0)
    channels, k = 3, 4
    block = DensePositionAttention(channels, dense_features=k, dilation=2,
                                   assignment_temperature=tau).requires_grad_(False)
    x = torch.randn(2, channels, 2, 3, 2)
    out, attention = block(x)
    assert out.shape == x.shape and attention.shape == (2, k, 2, 3, 2)
    for n in range(2):
        m = x[n].reshape(channels, -1)                                   # M: C x S
        logits = block.assign(x[n:n + 1])[0].reshape(k, -1) / tau       # K x S
        voxels = m.shape[1]
        dense = []                                                       # D_i = sum_s softmax_s(logits_i) M_s
        for i in range(k):
            w = [math.exp(logits[i, s]) for s in range(voxels)]
            dense.append(sum(w[s] / sum(w) * m[:, s] for s in range(voxels)))
        for j in range(voxels):
            scores = [math.exp(torch.dot(dense[i], m[:, j])) for i in range(k)]
            a = [score / sum(scores) for score in scores]                # Eq. 10
            expected = sum(a[i] * dense[i] for i in range(k)) + m[:, j]  # Eq. 11
            torch.testing.assert_close(out[n].reshape(channels, -1)[:, j], expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(attention[n].reshape(k, -1)[:, j], torch.tensor(a), atol=1e-6, rtol=1e-5)


def test_dense_position_attention_cost_is_linear_in_the_voxels():
    # the paper's point against non-local attention (O(S^2)): doubling the voxels doubles the FLOPs
    with torch.device("meta"):
        block = DensePositionAttention(16, dense_features=10)
        flops = []
        for depth in (16, 32):
            counter = FlopCounterMode(display=False)
            with counter:
                block(torch.empty(1, 16, depth, 16, 16))
            flops.append(counter.get_total_flops())
    voxels = 16 * 16 * 16
    conv, products = 2 * 16 * 10 * 27 * voxels, 3 * 2 * 16 * 10 * voxels   # dilated conv; D, A, O products
    assert flops == [conv + products, 2 * (conv + products)]


def test_channel_self_attention_against_a_loop_over_eq_12_13():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 2, 2, 3)
    out, attention = ChannelSelfAttention()(x)
    m = x[0].reshape(4, -1)
    voxels = m.shape[1]
    for j in range(4):
        scores = [math.exp(torch.dot(m[j], m[i]) / voxels) for i in range(4)]
        a = [score / sum(scores) for score in scores]                    # Eq. 12 (Gram / S)
        torch.testing.assert_close(attention[0, j], torch.tensor(a), atol=1e-6, rtol=1e-5)
        expected = sum(a[i] * m[i] for i in range(4)) + m[j]             # Eq. 13
        torch.testing.assert_close(out[0].reshape(4, -1)[j], expected, atol=1e-5, rtol=1e-5)


def test_attention_products_run_in_float32_under_float16_autocast():
    # The predictor runs CUDA in float16: a channel Gram matrix over S voxels overflows it (diagonal
    # ~ S * 16 here, max 65504) and softmax weights ~1/S fall below its normal range.
    torch.manual_seed(0)
    x = torch.randn(1, 8, 30, 32, 32) * 4
    position = DensePositionAttention(8).requires_grad_(False)
    torch.nn.init.zeros_(position.assign.weight)                         # uniform weights 1/S, exact in any dtype
    for block in (ChannelSelfAttention(), position):
        expected, expected_attention = block(x)
        with torch.autocast("cpu", dtype=torch.float16):
            out, attention = block(x)
        assert out.dtype == x.dtype
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attention, expected_attention, atol=1e-6, rtol=1e-5)


def test_mdsa_is_position_then_channel_attention():
    torch.manual_seed(0)
    block = MultiDimensionalSelfAttention(6, dense_features=3)
    x = torch.randn(1, 6, 4, 4, 4)
    positioned, position_attention = block.position(x)
    expected, _ = ChannelSelfAttention()(positioned)
    out, attention = block(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(attention, position_attention)


def test_cascade_multi_scale_convolution_follows_eq_14():
    torch.manual_seed(0)
    block = CascadeMultiScaleConv(3).eval()
    x = torch.randn(1, 3, 6, 6, 6)
    assert [c[0].kernel_size for c in (block.conv5, block.conv3, block.conv1, block.fuse)] == \
        [(5, 5, 5), (3, 3, 3), (1, 1, 1), (1, 1, 1)]
    x1 = block.conv5(x)
    x2 = block.conv3(x + x1)
    x3 = block.conv1(x + x2)
    torch.testing.assert_close(block(x), block.fuse(torch.cat([x, x1, x2, x3], 1)))


def test_softmax_binary_cross_entropy_by_hand_and_at_extremes():
    # two classes, one voxel, p = (0.25, 0.75), label 1: BCE per channel -log(1 - .25), -log(.75)
    logits = torch.tensor([0.0, math.log(3)]).view(1, 2, 1, 1, 1)
    label = torch.ones(1, 1, 1, 1, dtype=torch.long)
    assert softmax_binary_cross_entropy(logits, label).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 4, 3, 3, 3), torch.randint(0, 4, (2, 3, 3, 3))
    reference = F.binary_cross_entropy(torch.softmax(logits, 1), F.one_hot(labels, 4).movedim(-1, 1).float())
    torch.testing.assert_close(softmax_binary_cross_entropy(logits, labels), reference)
    confident = torch.tensor([0.0, 200.0, -200.0]).view(1, 3, 1, 1, 1).requires_grad_()
    loss = softmax_binary_cross_entropy(confident, label)                # p_1 = 1 exactly in float32
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(confident.grad).all()


def test_dual_supervision_weights_output_and_coarse_paths():
    torch.manual_seed(0)
    net = models.build("mda_unet", 1, 3, base_features=4, depth=3).train()
    out = net(torch.randn(1, 1, 8, 12, 8))
    labels = torch.randint(0, 3, (1, 8, 12, 8))
    main = softmax_binary_cross_entropy(out.logits, labels)
    coarse = softmax_binary_cross_entropy(out.aux["coarse_logits"], labels)
    total, parts = build_mda_unet_loss()(out, labels)                    # paper: lambda_out 10, lambda_m 1
    torch.testing.assert_close(total, 10 * main + coarse)
    total, _ = build_mda_unet_loss(lambda_out=1.0, lambda_aux=0.5)(out, labels)
    torch.testing.assert_close(total, main + 0.5 * coarse)
    assert set(parts) == {"output_bce", "coarse_bce", "dual"}


@pytest.mark.parametrize("modalities, classes, size, depth, k", [
    (1, 3, (24, 40, 56), 4, 10),   # odd multiples of the divisor 8
    (4, 2, (8, 24, 40), 4, 5),
    (2, 5, (12, 20, 4), 3, 1),     # divisor 4
])
def test_shapes_in_training_and_inference(modalities, classes, size, depth, k):
    torch.manual_seed(0)
    net = models.build("mda_unet", modalities, classes, base_features=4, depth=depth, dense_features=k)
    assert net.divisor == 2 ** (depth - 1)
    x = torch.randn(1, modalities, *size)
    out = net.train()(x)
    assert out.logits.shape == out.aux["coarse_logits"].shape == (1, classes, *size)
    assert out.maps["position_attention"].shape == (1, k, *size)
    assert out.maps["coarse_segmentation"].shape == (1, classes, *size)
    with torch.no_grad():
        out = net.eval()(x)
    assert out.aux == {} and set(out.maps) == set(net.map_descriptions())
    assert net.class_channel_maps == ("coarse_segmentation",)


def test_maps_are_distributions():
    torch.manual_seed(1)
    net = models.build("mda_unet", 1, 3, base_features=4).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, 16, 24, 16))
    for name in ("position_attention", "coarse_segmentation"):
        value = out.maps[name]
        assert 0 <= value.min() and value.max() <= 1, name
        torch.testing.assert_close(value.sum(1), torch.ones_like(value[:, 0]), msg=name)
    assert out.maps["position_attention"].std(dim=(2, 3, 4)).mean() > 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="dense_features"):
        models.build("mda_unet", 1, 3, dense_features=0)
    with pytest.raises(ValueError, match="depth must be at least 2"):
        models.build("mda_unet", 1, 3, depth=1)
    with pytest.raises(ValueError, match="assignment_temperature must be above 0"):
        models.build("mda_unet", 1, 3, assignment_temperature=0.0)
    with pytest.raises(ValueError, match="divisible by 8"):
        models.build("mda_unet", 1, 3)(torch.randn(1, 1, 12, 16, 16))
    with pytest.raises(ValueError, match="model.train"):
        net = models.build("mda_unet", 1, 3, base_features=4).eval()
        build_mda_unet_loss()(net(torch.randn(1, 1, 16, 16, 16)), torch.zeros(1, 16, 16, 16, dtype=torch.long))


def test_dual_loss_reaches_every_parameter():
    torch.manual_seed(0)
    net = models.build("mda_unet", 2, 3, base_features=4).train()
    total, _ = build_mda_unet_loss()(net(torch.randn(2, 2, 16, 16, 8)), torch.randint(0, 3, (2, 16, 16, 8)))
    total.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
    assert not missing, missing


def test_dual_supervision_fits_a_real_patch(hippocampus_case):
    torch.manual_seed(0)
    x, y = labelled_patch(*hippocampus_case, size=(24, 40, 24))
    assert set(y.unique().tolist()) == {0, 1, 2}
    net = models.build("mda_unet", 1, 3, base_features=4).train()
    loss = build_mda_unet_loss()
    history = fit(net, lambda _: loss(net(x), y), steps=30, lr=5e-3)
    first, last = history[0], history[-1]
    assert last["total"] < 0.7 * first["total"], history
    assert last["output_bce"] < 0.7 * first["output_bce"] and last["coarse_bce"] < 0.7 * first["coarse_bce"], history
