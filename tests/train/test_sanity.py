"""The model-randomisation sanity check (cubcam.train.inspection.sanity) on small nets and gradient methods."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
import torchvision
from nets import AsModule, SmallNet, trained_looking
from torch import nn

from cubcam.cams.targets import make_target
from cubcam.train.inspection.plots import sanity_figure
from cubcam.train.inspection.sanity import (
    SANITY_LEVEL,
    SanityResult,
    blocks,
    edge_maps,
    reinitialise,
    sanity_check,
    similarity,
)


def test_blocks_follow_the_forward_order_at_the_stages_granularity() -> None:
    assert blocks(SmallNet()) == ["stem", "features", "fc"]
    resnet = blocks(torchvision.models.resnet18())
    assert resnet == ["conv1", "bn1", *(f"layer{s}.{b}" for s in range(1, 5) for b in range(2)), "fc"]
    module = AsModule(SmallNet())  # a wrapper is opened: its blocks are the net's
    assert blocks(module) == ["net.stem", "net.features", "net.fc"]


def test_reinitialise_touches_one_block_from_its_seed_and_leaves_the_rng() -> None:
    torch.manual_seed(0)
    net = trained_looking(SmallNet())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.random.get_rng_state()
    reinitialise(net, "features", seed=5)
    assert torch.equal(torch.random.get_rng_state(), rng)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("features.") for k in changed)
    assert torch.equal(net.features[1].running_var, torch.ones(16))  # BatchNorm: fresh statistics
    again = trained_looking(SmallNet())
    reinitialise(again, "features", seed=5)
    assert torch.equal(again.features[0].weight, net.features[0].weight)

    class Scaled(nn.Module):  # a parameter with no reset_parameters is drawn from N(0, 0.02^2)
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4000))

    scaled = Scaled()
    reinitialise(nn.Sequential(scaled), "0", seed=1)
    assert abs(scaled.gain.std().item() - 0.02) < 0.002 and abs(scaled.gain.mean().item()) < 0.002


def test_similarity_is_spearman_per_image_and_ssim() -> None:
    torch.manual_seed(0)
    maps, reference = torch.rand(3, 12, 12), torch.rand(3, 12, 12)
    maps[0] = reference[0] ** 3  # a monotone transform: rank correlation 1
    maps[1][maps[1] < 0.5] = 0  # ties, as after a ReLU
    maps[2] = 0.0  # a constant map ranks nothing
    rank, ssim = similarity(maps, reference)
    expected = [scipy.stats.spearmanr(m.flatten(), r.flatten())[0] for m, r in zip(maps[:2], reference[:2])]
    np.testing.assert_allclose(rank[:2].numpy(), expected, atol=1e-6)
    assert rank[2] == 0 and rank[0] == pytest.approx(1.0)
    assert similarity(reference, reference)[1].tolist() == pytest.approx([1.0] * 3)
    assert (ssim[1:] < 0.9).all()


@pytest.fixture(scope="module")
def checked() -> tuple[SanityResult, nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    module = AsModule(trained_looking(SmallNet())).eval()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    images = torch.randn(3, 3, 32, 32)
    target = make_target("classifier", "normalized_mean", module(images).detach(), torch.zeros(3, dtype=torch.long))
    methods = {w: (target, w) for w in ("gradcam", "gradcam++")}
    steps: list[int] = []
    result = sanity_check(module, images, torch.tensor([0, 3, 1]), methods, seed=0, progress=lambda: steps.append(1))
    assert len(steps) == 2 * 3
    return result, module, state


def test_the_cascade_and_the_independent_steps(checked) -> None:
    result, module, state = checked
    assert result.blocks == ["net.fc", "net.features", "net.stem"]  # head first
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())  # the model is never modified
    for mode in ("cascade", "independent"):
        assert set(result.curves[mode]) == {"gradcam", "gradcam++", "edge", "random"}
        edge = result.curves[mode]["edge"]  # the image's own edges: untouched by the model, always 1
        assert edge["spearman"] == pytest.approx([1.0] * 3) and edge["ssim"] == pytest.approx([1.0] * 3)
        assert all(abs(v) < 0.3 for v in result.curves[mode]["random"]["spearman"])
    cascade, independent = result.curves["cascade"]["gradcam"], result.curves["independent"]["gradcam"]
    assert cascade["spearman"][0] == independent["spearman"][0]  # the head alone, re-initialised alike
    assert cascade["spearman"][-1] < SANITY_LEVEL  # GradCAM passes (Adebayo et al.): its maps follow the weights
    assert result.failed() == []
    assert [len(m) for m in result.first_maps.values()] == [4, 4]  # trained, then after each step
    assert not torch.equal(result.first_maps["gradcam"][0], result.first_maps["gradcam"][-1])


def test_a_method_that_survives_randomisation_is_flagged(checked) -> None:
    result, _, _ = checked
    survivor = {"spearman": [0.9, 0.8, 0.7], "ssim": [0.9, 0.9, 0.9]}
    curves = {mode: result.curves[mode] | {"survivor": survivor} for mode in ("cascade", "independent")}
    flagged = SanityResult(result.blocks, curves, result.first_maps)  # type: ignore[arg-type]
    assert flagged.failed() == ["survivor"] and flagged.failed(level=0.75) == []


def test_edge_maps_are_the_sobel_magnitude() -> None:
    image = torch.zeros(1, 3, 8, 8)
    image[..., 4:] = 1.0  # a vertical step edge between columns 3 and 4
    edges = edge_maps(image)[0]
    assert edges[:, 3:5].min() == 1 and edges[:, :2].max() == 0 and edges[:, 6:].max() == 0


def test_the_sanity_plots_legend_covers_no_curve() -> None:
    """Inside the upper-right axes it covered the curves (issue 33); outside them, to the right, it overlaps none."""
    blocks_ = ["net.fc", "net.layer4", "net.layer3", "net.layer2", "net.layer1", "net.conv1"]
    curve = {"spearman": [0.9, 0.8, 0.7, 0.5, 0.3, 0.1], "ssim": [0.9, 0.7, 0.6, 0.4, 0.2, 0.1]}
    flat = {"spearman": [0.9] * 6, "ssim": [0.8] * 6}
    sanity = {
        "blocks": blocks_,
        "level": 0.5,
        "cascade": {"gradcam": curve, "edge": flat},
        "independent": {"gradcam": curve, "edge": flat},
    }
    figure = sanity_figure(sanity, {"gradcam": "GradCAM", "edge": "edge detector"})
    figure.draw_without_rendering()
    (legend,) = figure.legends
    box = legend.get_window_extent()
    assert [text.get_text() for text in legend.get_texts()] == ["GradCAM", "edge detector"]
    for axis in figure.axes:
        assert not box.overlaps(axis.get_window_extent()), axis.get_title()
