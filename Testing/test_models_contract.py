"""Every registered architecture honours the SegOutput contract: any modality and class count, any
patch divisible by its divisor, maps as described, ``segment`` giving forward's logits, gradients
reaching every parameter."""
from __future__ import annotations

import pytest
import torch

from AttnSegLib import models
from AttnSegLib.models import SegOutput

EXPECTED = {"unet", "dam_al", "cga_unet", "difficulty_aware", "rsanet", "mda_unet"}


def test_registry_lists_the_six_architectures():
    assert set(models.names()) == EXPECTED
    # the click refinement network is registered apart (its input adds class and click channels:
    # Testing/test_refine.py)
    assert models.names("refinement") == ["click_refiner"]
    assert set(models.names(None)) == EXPECTED | {"click_refiner"}


def test_unknown_names_list_the_known_ones():
    with pytest.raises(models.UnknownArchitectureError, match="known architectures: .*unet"):
        models.build("vnet", 1, 2)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("modalities, classes", [(1, 3), (4, 2), (2, 5)])
def test_shapes_for_modalities_and_classes(name, modalities, classes):
    torch.manual_seed(0)
    net = models.build(name, modalities, classes).eval()
    d = net.divisor
    size = (d * 2, d * 3, d * 2) if d >= 16 else (d * 3, d * 5, d * 2)  # odd multiples, anisotropic
    with torch.no_grad():
        out = net(torch.randn(1, modalities, *size))
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (1, classes, *size)
    assert out.aux == {}
    assert set(out.maps) == set(net.map_descriptions())
    for key, value in out.maps.items():
        assert value.ndim == 5 and value.shape[0] == 1, key
        assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_segment_gives_the_logits_of_forward(name):
    """The step inference runs when no map is asked for: the same logits, maps or no maps."""
    torch.manual_seed(0)
    net = models.build(name, 1, 3).eval()
    d = net.divisor
    x = torch.randn(1, 1, d * 2, d * 3, d * 2)
    with torch.no_grad():
        torch.testing.assert_close(net.segment(x), net(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sizes_not_divisible_are_refused(name):
    net = models.build(name, 1, 2)
    if net.divisor == 1:
        pytest.skip("no down-sampling")
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 1, net.divisor + 1, net.divisor, net.divisor))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    net = models.build(name, 2, 3).train()
    d = net.divisor
    out = net(torch.randn(2, 2, d, 2 * d, d))
    loss = out.logits.square().mean() + sum(v.float().square().mean() for v in out.maps.values()) \
        + sum(v.float().square().mean() for v in out.aux.values() if torch.is_tensor(v) and v.is_floating_point())
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"{name}: no gradient for {missing[:5]}"
