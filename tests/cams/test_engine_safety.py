"""The engine is safe in the middle of training: hooks removed, no grads written, flags, BatchNorm and RNG
untouched, batches equal single images, flat and non-finite maps, no_grad and autocast, memory flat."""

from __future__ import annotations

import resource

import pytest
import torch
from nets import Penultimate, SmallNet, corr
from torch import nn

from cubcam.cams import EmbeddingCAM, GradCAM, minmax_normalize


def test_hooks_removed_even_when_the_call_raises(net, images):
    gc = GradCAM(net, "features")
    gc(images)
    with pytest.raises(ValueError, match="targets must lie"):
        gc(images, torch.tensor([0, 1, 2, 99]))
    for module in net.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks


def test_no_grad_written_and_nothing_below_the_layer_backpropagated(net, images):
    below: list[str] = []
    handle = net.stem.register_full_backward_hook(lambda *args: below.append("stem"))
    try:
        GradCAM(net, "features")(images)
        EmbeddingCAM(Penultimate(net), "net.features")(images, torch.randn(16))
    finally:
        handle.remove()
    assert below == []
    assert all(p.requires_grad and p.grad is None for p in net.parameters())


def test_flags_restored_and_batchnorm_statistics_unchanged(images):
    torch.manual_seed(0)
    net = SmallNet(dropout=0.5).train()
    net.stem.eval()  # a mixed state must come back exactly
    flags = [m.training for m in net.modules()]
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    GradCAM(net, "features")(images)
    assert [m.training for m in net.modules()] == flags
    for k, v in net.state_dict().items():
        assert torch.equal(v, stats[k]), k
    assert torch.equal(torch.get_rng_state(), rng)  # eval mode: dropout drew no random numbers


def test_batch_equals_one_by_one(net, images):
    gc = GradCAM(net, "features")
    batch = gc(images)
    single = torch.cat([gc(images[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(batch, single, atol=1e-6, rtol=1e-5)


def test_constant_input_and_flat_maps_give_zeros_not_nan(net):
    maps = GradCAM(net, "features")(torch.zeros(2, 3, 32, 32))
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    flat = minmax_normalize(torch.full((2, 4, 4), 3.0))
    assert torch.equal(flat, torch.zeros(2, 4, 4))

    class Blind(nn.Module):  # the score ignores the map entirely except through a constant: w = 0
        def __init__(self):
            super().__init__()
            self.layer = nn.Identity()

        def forward(self, x):
            return (self.layer(x) * 0).mean((2, 3))

    maps = GradCAM(Blind(), "layer")(torch.randn(2, 3, 8, 8))
    assert torch.equal(maps, torch.zeros(2, 8, 8))


def test_works_under_no_grad_and_refuses_inference_mode(net, images):
    gc = GradCAM(net, "features")
    expected = gc(images)
    with torch.no_grad():
        torch.testing.assert_close(gc(images), expected)
    assert torch.is_grad_enabled()
    with torch.inference_mode():
        inference_images = images.clone()
        with pytest.raises(RuntimeError, match=r"inference_mode\(False\)"):
            gc(inference_images)
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
        ):  # the documented way out, inference tensor input included
            torch.testing.assert_close(gc(inference_images), expected)


def test_memory_stays_flat_over_200_calls(net):
    gc = GradCAM(net, "features")
    x = torch.randn(8, 3, 64, 64)
    for _ in range(20):
        gc(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(200):
        gc(x)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 20 * 1024, f"peak RSS grew by {grown_kib} KiB over 200 calls"
    assert not net.features._forward_hooks


def test_autocast_matches_float32(net, images):
    gc = GradCAM(net, "features")
    expected = gc(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = gc(images)
    assert maps.dtype == torch.float32
    assert corr(maps.numpy(), expected.numpy()) > 0.98


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_matches_cpu(net, images):
    expected = GradCAM(net, "features")(images)
    gpu = net.cuda()
    maps = GradCAM(gpu, "features")(images.cuda())
    assert maps.device.type == "cuda"
    torch.testing.assert_close(maps.cpu(), expected, atol=1e-4, rtol=1e-4)


def test_non_finite_maps_become_nan_before_the_stretch_and_flat_ones_zeros() -> None:
    maps = torch.stack([torch.rand(4, 4), torch.zeros(4, 4), torch.rand(4, 4)])
    maps[2, 1, 1] = float("nan")
    out = minmax_normalize(maps)
    assert out[0].min() == 0 and out[0].max() == 1
    assert (out[1] == 0).all()  # an empty (ReLU'd) map stays empty
    assert out[2].isnan().all()  # was: zeros, scored as misses
