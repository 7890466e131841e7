"""RSANet: slice attention (Eq. 1-2) against a brute-force loop, the recurrent RSA chain, the
per-voxel summaries, placements, the exponentially weighted cross-entropy, and a real fit."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from real_patch import fit, labelled_patch

from AttnSegLib import models
from AttnSegLib.models.blocks import RecurrentSliceAttention, slice_attention
from AttnSegLib.models.rsanet import received_attention
from training.losses import build_rsanet_loss
from training.losses.rsanet import class_frequencies_of, exponential_class_weights

SMALL = dict(features=(4, 8, 16))


def _brute_force_slice_attention(q, k, v, dim, scaled):
    """Eq. 1-2 one slice pair at a time: A_ij = softmax_j(<M_2[i], M_1[j]>), out_i = sum_j A_ij M_3[j]."""
    slices = q.shape[dim]
    length = q.select(dim, 0)[0].numel()
    out = torch.zeros_like(v)
    attention = torch.zeros(q.shape[0], slices, slices)
    for n in range(q.shape[0]):
        for i in range(slices):
            scores = torch.stack([(q[n].select(dim - 1, i) * k[n].select(dim - 1, j)).sum() for j in range(slices)])
            weights = torch.softmax(scores / math.sqrt(length) if scaled else scores, dim=0)
            attention[n, i] = weights
            out[n].select(dim - 1, i).copy_(sum(weights[j] * v[n].select(dim - 1, j) for j in range(slices)))
    return out, attention


@pytest.mark.parametrize("dim", [2, 3, 4])
@pytest.mark.parametrize("scaled", [True, False])
def test_slice_attention_matches_a_brute_force_loop(dim, scaled):
    torch.manual_seed(dim)
    q, k, v = (0.3 * torch.randn(2, 3, 4, 5, 6) for _ in range(3))
    out, attention = slice_attention(q, k, v, dim, scaled)
    expected_out, expected_attention = _brute_force_slice_attention(q, k, v, dim, scaled)
    torch.testing.assert_close(attention, expected_attention)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(attention.sum(2), torch.ones(2, q.shape[dim]))


def test_slice_products_stay_in_float32_under_float16_autocast():
    """q . k over L = 8 * 32 * 32 elements of 3 * 3 is 73,728, beyond float16's 65,504."""
    q = torch.full((1, 8, 4, 32, 32), 3.0)
    with torch.autocast("cpu", dtype=torch.float16):
        out, attention = slice_attention(q, q, q, dim=2)
    torch.testing.assert_close(attention, torch.full((1, 4, 4), 0.25))
    assert out.dtype == torch.float32 and torch.equal(out, q)


def test_rsa_chains_sagittal_coronal_axial_with_shared_convs_and_own_alphas():
    torch.manual_seed(0)
    block = RecurrentSliceAttention(3)
    x = torch.randn(2, 3, 4, 5, 6)
    out, _ = block(x)
    torch.testing.assert_close(out, x)                                    # alpha = 0: identity at start
    with torch.no_grad():
        block.alpha.copy_(torch.tensor([0.5, -0.3, 0.8]))
    out, attentions = block(x)
    expected = x
    for alpha, (name, dim) in zip([0.5, -0.3, 0.8], [("sagittal", 4), ("coronal", 3), ("axial", 2)]):
        q, k, v = (F.conv3d(expected, conv.weight, conv.bias) for conv in (block.query, block.key, block.value))
        attended, matrix = _brute_force_slice_attention(q, k, v, dim, scaled=True)
        torch.testing.assert_close(attentions[name], matrix)
        expected = alpha * attended + expected                            # Eq. 2, fed to the next axis
    torch.testing.assert_close(out, expected)
    assert attentions["sagittal"].shape == (2, 6, 6) and attentions["axial"].shape == (2, 4, 4)


def test_received_attention_is_the_column_mean_broadcast_over_the_slice():
    attention = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.2, 0.6]]])
    summary = received_attention(attention, (3, 2, 4), dim=2)
    assert summary.shape == (1, 1, 3, 2, 4)
    for d, value in enumerate([0.7 / 3, 1.7 / 3, 0.6 / 3]):
        torch.testing.assert_close(summary[0, 0, d], torch.full((2, 4), value))
    sagittal = received_attention(attention, (2, 5, 3), dim=4)
    torch.testing.assert_close(sagittal[0, 0, 1, 4], torch.tensor([0.7, 1.7, 0.6]) / 3)


@pytest.mark.parametrize("placement, positions, map_size", [
    ("010", {"bottom"}, (4, 6, 10)), ("101", {"encoder", "decoder"}, (8, 12, 20)),
    ("111", {"encoder", "bottom", "decoder"}, (8, 12, 20))])
def test_placements(placement, positions, map_size):
    torch.manual_seed(0)
    net = models.build("rsanet", 1, 3, placement=placement, **SMALL).train()
    assert set(net.rsa) == positions
    out = net(torch.randn(1, 1, 16, 24, 40))
    assert set(out.aux) == {f"slice_attention.{p}.{a}" for p in positions for a in ("sagittal", "coronal", "axial")}
    for axis in ("sagittal", "coronal", "axial"):
        assert out.maps[f"slice_attention.{axis}"].shape == (1, 1, *map_size)
    with pytest.raises(ValueError, match="placement"):
        models.build("rsanet", 1, 3, placement="011x")
    with pytest.raises(ValueError, match="placement"):
        models.build("rsanet", 1, 3, placement="000")


@pytest.mark.parametrize("modalities, classes", [(1, 3), (3, 2), (4, 5)])
def test_shapes_and_map_ranges(modalities, classes):
    torch.manual_seed(0)
    net = models.build("rsanet", modalities, classes, placement="111", **SMALL)
    size = (12, 20, 28)                                                   # odd multiples of 4
    out = net.train()(torch.randn(2, modalities, *size))
    assert out.logits.shape == (2, classes, *size)
    for name, matrix in out.aux.items():
        torch.testing.assert_close(matrix.sum(2), torch.ones(matrix.shape[:2]), msg=name)
    with torch.no_grad():
        evaluated = net.eval()(torch.randn(2, modalities, *size))
    assert evaluated.aux == {}
    for axis, dim in (("sagittal", 4), ("coronal", 3), ("axial", 2)):
        summary = evaluated.maps[f"slice_attention.{axis}"]
        assert summary.shape == (2, 1, 6, 10, 14)
        assert summary.min() >= 0 and summary.max() <= 1
        per_slice = summary.movedim(dim, -1).flatten(1, -2)[:, 0]         # one value per slice
        torch.testing.assert_close(per_slice.sum(1), torch.ones(2))       # each row of A sums to 1


def test_alpha_start_and_temperature_options():
    """alpha_init sets the three alphas; temperature T divides the scaled products (T = 1: as before)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 3, 4, 5, 6) for _ in range(3))
    _, plain = slice_attention(q, k, v, 2)
    _, sharp = slice_attention(q, k, v, 2, temperature=0.1)
    _, tenfold = slice_attention(10 * q, k, v, 2)
    torch.testing.assert_close(sharp, tenfold)
    entropy = lambda a: -(a * a.log()).sum(2).mean()                      # noqa: E731
    assert entropy(sharp) < entropy(plain)
    block = RecurrentSliceAttention(3, alpha_init=1.0, temperature=0.1)
    assert block.alpha.tolist() == [1.0, 1.0, 1.0] and block.temperature == 0.1
    net = models.build("rsanet", 1, 3, alpha_init=1.0, attention_temperature=0.1, **SMALL)
    assert all(b.alpha.tolist() == [1.0] * 3 and b.temperature == 0.1 for b in net.rsa.values())
    with pytest.raises(ValueError, match="temperature must be > 0"):
        RecurrentSliceAttention(3, temperature=0.0)


def test_with_alpha_started_at_one_the_query_and_key_learn_from_the_first_step():
    torch.manual_seed(0)
    net = models.build("rsanet", 2, 3, placement="111", alpha_init=1.0, attention_temperature=0.1, **SMALL).train()
    x, target = torch.randn(2, 2, 8, 12, 16), torch.randint(0, 3, (2, 8, 12, 16))
    build_rsanet_loss()(net(x), target)[0].backward()
    for block in net.rsa.values():
        assert all(p.grad.abs().sum() > 0 for conv in (block.query, block.key) for p in conv.parameters())


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = models.build("rsanet", 2, 3, placement="111", **SMALL).train()
    x, target = torch.randn(2, 2, 8, 12, 16), torch.randint(0, 3, (2, 8, 12, 16))
    build_rsanet_loss()(net(x), target)[0].backward()
    # alpha = 0 at start: the alphas learn, the query/key/value convs wait for them (Eq. 2)
    for block in net.rsa.values():
        assert (block.alpha.grad != 0).all()
        assert all((p.grad == 0).all() for conv in (block.query, block.key, block.value) for p in conv.parameters())
    net.zero_grad()
    with torch.no_grad():
        for block in net.rsa.values():
            block.alpha.fill_(0.5)
    build_rsanet_loss()(net(x), target)[0].backward()
    silent = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent


def test_exponential_class_weights_by_hand():
    r = 5e-4                                                              # the paper's lesion portion
    weights = exponential_class_weights(torch.tensor([1 - r, r]))
    denominator = math.exp(r) + math.exp(1 - r)
    torch.testing.assert_close(weights, torch.tensor([math.exp(r), math.exp(1 - r)], dtype=torch.float64) / denominator)
    assert weights[1] > weights[0]                                        # the rare class weighs more
    assert class_frequencies_of([torch.tensor([0, 0, 1, 2]), torch.tensor([[0, 2]])], 3).tolist() == \
        [0.5, 1 / 6, 1 / 3]


def test_weighted_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0], [1.0, -2.0, 0.0]]).T.reshape(1, 3, 4, 1, 1)
    target = torch.tensor([0, 1, 2, 0]).reshape(1, 4, 1, 1)
    frequencies = [0.5, 0.25, 0.25]
    w = [math.exp(1 - f) for f in frequencies]
    log_p = torch.log_softmax(logits.reshape(3, 4).T, dim=1)
    expected = -sum(w[c] * log_p[i, c] for i, c in enumerate([0, 1, 2, 0])) / (w[0] * 2 + w[1] + w[2])
    loss, parts = build_rsanet_loss(frequencies)(models.SegOutput(logits, {}, {}), target)
    assert loss.item() == pytest.approx(expected.item())
    batch_portions, _ = build_rsanet_loss()(models.SegOutput(logits, {}, {}), target)
    assert batch_portions.item() == pytest.approx(expected.item())      # this batch has those portions
    with pytest.raises(ValueError, match="summing to 1"):
        build_rsanet_loss([0.5, 0.2])


def test_fitting_a_real_patch_lowers_the_loss(hippocampus_case):
    torch.manual_seed(0)
    x, y = labelled_patch(*hippocampus_case, (32, 48, 32))
    net = models.build("rsanet", 1, 3, placement="111", **SMALL).train()
    loss_fn = build_rsanet_loss(class_frequencies_of([y], 3).tolist())
    history = fit(net, lambda _: loss_fn(net(x), y), steps=30, lr=3e-3)
    assert history[-1]["total"] < 0.6 * history[0]["total"]
    assert any((block.alpha != 0).all() for block in net.rsa.values())
