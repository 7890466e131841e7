"""CGA U-Net: prototypes (Eq. 7), intra-class update (Eq. 8), inter-class distance and loss
(Eq. 9-10), the attention conv path, the paper's parameter counts, and a real fit."""
from __future__ import annotations

import math

import pytest
import torch
from real_patch import fit, labelled_patch

from AttnSegLib import models
from AttnSegLib.models.cga_unet import (PAPER_CONFIGURATION, SupervisedAttentionModule, class_prototypes,
                                        count_parameters, regenerate_from_prototypes)
from training.losses import build_cga_unet_loss
from training.losses.cga_unet import downsampled_one_hot, inter_class_distance

SMALL = dict(base_features=4, blocks=(1, 1, 1, 1), attention_features=4)


def test_prototypes_are_masked_averages_by_hand():
    # 2 feature channels over 4 voxels; class 0 on voxels 0-1, class 1 on voxel 3, class 2 absent
    features = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]]).reshape(1, 2, 1, 1, 4)
    masks = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]).reshape(1, 3, 1, 1, 4)
    prototypes, sums = class_prototypes(features, masks)
    torch.testing.assert_close(prototypes, torch.tensor([[[1.5, 15.0], [4.0, 40.0], [0.0, 0.0]]]))
    torch.testing.assert_close(sums, torch.tensor([[2.0, 1.0, 0.0]]))
    # soft weights (Eq. 7's w_i): (0.5 * 1 + 1.0 * 2 + 0.5 * 3) / 2
    soft, _ = class_prototypes(features, torch.tensor([0.5, 1.0, 0.5, 0.0]).reshape(1, 1, 1, 1, 4))
    torch.testing.assert_close(soft, torch.tensor([[[2.0, 20.0]]]))
    # Eq. 8: each voxel takes its class's prototype; voxel 2 belongs to no mask
    regenerated = regenerate_from_prototypes(prototypes, masks)
    torch.testing.assert_close(regenerated.reshape(2, 4), torch.tensor([[1.5, 1.5, 0.0, 4.0], [15.0, 15.0, 0.0, 40.0]]))


def test_prototypes_stay_in_float32_under_float16_autocast():
    """A masked sum of 32^3 voxels of value 4 is 131,072, beyond float16's 65,504."""
    features = torch.full((1, 2, 32, 32, 32), 4.0, dtype=torch.float16)
    masks = torch.ones(1, 1, 32, 32, 32, dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.float16):
        prototypes, sums = class_prototypes(features, masks)
    torch.testing.assert_close(prototypes, torch.full((1, 1, 2), 4.0))
    assert sums.item() == 32 ** 3


def test_intra_class_update_adds_the_prototype_of_the_argmax_class():
    torch.manual_seed(0)
    sam = SupervisedAttentionModule(in_channels=1, num_classes=3, downsampling=2, features=4)
    features = torch.randn(2, 5, 3, 4, 2)
    attention = torch.randn(2, 3, 3, 4, 2)
    updated, prototypes, counts = sam(features, attention)
    classes = attention.argmax(1)
    for n in range(2):
        for k in range(3):
            voxels = features[n][:, classes[n] == k]                       # (F, count)
            assert counts[n, k] == voxels.shape[1]
            if voxels.shape[1]:
                torch.testing.assert_close(prototypes[n, k], voxels.mean(1))
                torch.testing.assert_close(updated[n][:, classes[n] == k], voxels + voxels.mean(1, keepdim=True))
    plain = SupervisedAttentionModule(1, 3, 2, 4, intra_class_update=False)
    assert torch.equal(plain(features, attention)[0], features)


def test_inter_class_distance_and_loss_by_hand():
    # prototypes (0, 0), (3, 4), (0, 4): pair distances 5, 3, 4; Eq. 9 sums ordered pairs -> 24
    prototypes = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]]] * 2)
    present = torch.tensor([[True, True, True], [True, True, False]])
    torch.testing.assert_close(inter_class_distance(prototypes, present), torch.tensor([24.0, 10.0]))

    output = models.SegOutput(torch.zeros(2, 3, 2, 2, 2), {}, {
        "category_attention": torch.zeros(2, 3, 1, 1, 1), "class_prototypes": prototypes,
        "class_voxel_counts": present.float()})
    target = torch.zeros(2, 2, 2, 2, dtype=torch.long)
    _, parts = build_cga_unet_loss()(output, target, epoch=0)
    expected = (math.log(1 / 25) + math.log(1 / 11)) / 2                  # Eq. 10, mean over the batch
    assert parts["inter_class"].item() == pytest.approx(expected)


def test_coincident_prototypes_give_finite_gradients():
    prototypes = torch.zeros(1, 3, 4, requires_grad=True)
    inter_class_distance(prototypes, torch.ones(1, 3, dtype=torch.bool)).sum().backward()
    assert torch.isfinite(prototypes.grad).all()


def test_category_guide_is_the_nearest_downsampled_one_hot():
    target = torch.arange(64).reshape(1, 4, 4, 4) % 3
    guide = downsampled_one_hot(target, 3, (2, 2, 2))
    expected = torch.nn.functional.one_hot(target[:, ::2, ::2, ::2], 3).movedim(-1, 1).float()
    assert torch.equal(guide, expected)


def test_paper_configuration_parameter_counts():
    net = models.build("cga_unet", **PAPER_CONFIGURATION)
    assert count_parameters(net) == 4_768_616                             # paper: 4.77 M
    assert count_parameters(net.sam) == 10_404                            # Table 1's path: 0.0104 M
    widths = [(m.in_channels, m.out_channels, m.stride) for m in net.sam.path]
    assert widths == [(4, 16, (2, 2, 2)), (16, 16, (2, 2, 2)), (16, 4, (2, 2, 2))]


@pytest.mark.parametrize("rate, strides", [(2, [2, 1, 1]), (4, [2, 2, 1]), (8, [2, 2, 2]), (16, [2, 2, 2, 2])])
def test_attention_path_downsamples_by_the_rate(rate, strides):
    net = models.build("cga_unet", 1, 3, blocks=(1, 1, 1, 1, 1), downsampling=rate, **{
        k: v for k, v in SMALL.items() if k != "blocks"}).eval()
    assert [m.stride[0] for m in net.sam.path] == strides
    with torch.no_grad():
        out = net(torch.randn(1, 1, 32, 48, 16))
    assert out.maps["category_attention"].shape == (1, 3, 32 // rate, 48 // rate, 16 // rate)


def test_attention_path_depth_width_and_norm_are_options():
    """The shipped path (three linear convs) keeps its parameter names; a deeper one puts GroupNorm and
    ReLU between its convs but none after the last, so S stays linear for its MSE."""
    plain = SupervisedAttentionModule(1, 3, downsampling=8)
    assert [type(m).__name__ for m in plain.path] == ["Conv3d"] * 3
    assert list(plain.state_dict()) == [f"path.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    deep = SupervisedAttentionModule(1, 3, downsampling=2, features=32, convs=6, norm="group", act="relu")
    kinds = [type(m).__name__ for m in deep.path]
    assert kinds == ["Conv3d", "GroupNorm", "ReLU"] * 5 + ["Conv3d"]
    convs = [m for m in deep.path if isinstance(m, torch.nn.Conv3d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == (
        [(1, 32, 2)] + [(32, 32, 1)] * 4 + [(32, 3, 1)])
    attention = deep.attention_map(torch.randn(2, 1, 8, 16, 8))
    assert attention.shape == (2, 3, 4, 8, 4) and attention.min() < 0              # linear S, not clipped
    with pytest.raises(ValueError, match="at least max\\(2, log2\\(downsampling\\)\\) = 3 convs"):
        SupervisedAttentionModule(1, 3, downsampling=8, convs=2)


def test_bad_downsampling_is_refused():
    with pytest.raises(ValueError, match="power of 2 between 2 and 2\\*\\*3"):
        models.build("cga_unet", 1, 3, downsampling=16)
    with pytest.raises(ValueError, match="power of 2"):
        models.build("cga_unet", 1, 3, downsampling=6)


@pytest.mark.parametrize("modalities, classes", [(1, 3), (4, 4), (2, 2)])
def test_shapes_and_map_range(modalities, classes):
    torch.manual_seed(0)
    net = models.build("cga_unet", modalities, classes, **SMALL)
    size = (24, 40, 56)                                                   # odd multiples of 8
    out = net.train()(torch.randn(2, modalities, *size))
    assert out.logits.shape == (2, classes, *size)
    assert out.aux["category_attention"].shape == (2, classes, 3, 5, 7)
    assert out.aux["class_prototypes"].shape == (2, classes, 32)          # bottleneck width 4 * 2**3
    assert out.aux["class_voxel_counts"].sum(1).tolist() == [105.0, 105.0]
    with torch.no_grad():
        evaluated = net.eval()(torch.randn(2, modalities, *size))
    assert evaluated.aux == {}
    category = evaluated.maps["category_attention"]
    assert category.shape == (2, classes, 3, 5, 7) and category.min() >= 0 and category.max() <= 1


def test_inter_class_loss_switches_on_at_its_epoch_and_needs_the_epoch():
    torch.manual_seed(0)
    net = models.build("cga_unet", 1, 3, **SMALL).train()
    target = torch.randint(0, 3, (1, 16, 16, 16))
    output = net(torch.randn(1, 1, 16, 16, 16))
    loss_fn = build_cga_unet_loss(inter_start_epoch=20)
    before, parts = loss_fn(output, target, epoch=19)
    torch.testing.assert_close(before, parts["dice"] + parts["attention_mse"])
    after, parts = loss_fn(output, target, epoch=20)
    torch.testing.assert_close(after, parts["dice"] + parts["attention_mse"] + 0.1 * parts["inter_class"])
    with pytest.raises(ValueError, match="epoch"):
        loss_fn(output, target)
    with pytest.raises(ValueError, match="model.train"):
        loss_fn(net.eval()(torch.randn(1, 1, 16, 16, 16)), target, epoch=0)


def test_loss_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = models.build("cga_unet", 2, 3, **SMALL).train()
    target = torch.zeros(2, 16, 24, 16, dtype=torch.long)
    target[:, 2:10, 4:16, 3:12] = 1
    target[:, 8:14, 10:20, 6:14] = 2
    loss, _ = build_cga_unet_loss()(net(torch.randn(2, 2, 16, 24, 16)), target, epoch=25)
    loss.backward()
    silent = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent


def test_inter_class_loss_pushes_the_prototypes_apart():
    torch.manual_seed(0)
    net = models.build("cga_unet", 1, 3, downsampling=2, **SMALL).train()
    x = torch.randn(1, 1, 16, 16, 16)
    optimiser = torch.optim.SGD(net.parameters(), lr=1e-2)
    distances = []
    for _ in range(3):
        aux = net(x).aux
        distance = inter_class_distance(aux["class_prototypes"], aux["class_voxel_counts"] > 0)
        distances.append(distance.item())
        optimiser.zero_grad()
        (-torch.log1p(distance)).mean().backward()                       # L_I alone
        optimiser.step()
    assert distances[0] > 0 and distances[0] < distances[1] < distances[2]


def test_fitting_a_real_patch_lowers_the_loss(hippocampus_case):
    torch.manual_seed(0)
    x, y = labelled_patch(*hippocampus_case, (32, 48, 32))
    net = models.build("cga_unet", 1, 3, downsampling=4, **SMALL).train()
    loss_fn = build_cga_unet_loss(inter_start_epoch=10)
    history = fit(net, lambda step: loss_fn(net(x), y, epoch=step), steps=30, lr=3e-3)  # a step per "epoch"
    first, last = history[0], history[-1]
    assert last["total"] < 0.8 * first["total"]
    assert last["dice"] < 0.8 * first["dice"]
    assert last["attention_mse"] < 0.5 * first["attention_mse"]
