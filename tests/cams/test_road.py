"""cams.road against closed forms and against pytorch-grad-cam's ROAD metrics on the same maps and scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from pytorch_grad_cam.metrics.road import (
    NoisyLinearImputer,
    ROADCombined,
    ROADLeastRelevantFirstAverage,
    ROADMostRelevantFirstAverage,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

from cubcam.cams import ClassLogits, Proxies
from cubcam.cams.road import impute, kept_pixels, road

SOLVERS = pytest.mark.parametrize("solver", ["direct", "iterative"])


@SOLVERS
def test_imputation_fills_a_linear_ramp_exactly(solver) -> None:
    """A linear ramp satisfies every neighbour-mean equation away from the border, so with no noise the pixels
    removed from its interior come back exactly; the known pixels are untouched."""
    ramp = torch.arange(8.0)[None, None, :] + 2 * torch.arange(8.0)[None, :, None]
    image = torch.cat([ramp, -ramp])  # [2, 8, 8]: the channels are solved together and independently
    kept = torch.ones(1, 8, 8, dtype=torch.bool)
    kept[:, 2:6, 1:7] = False
    filled = impute(image[None], kept, torch.Generator(), noise=0.0, solver=solver)[0]
    torch.testing.assert_close(filled, image, atol=1e-5, rtol=0)
    flat = torch.zeros_like(image)
    flat[:, 3, 3] = 1.0  # one known bright pixel among removed ones: the fill is a smooth bump, never above it
    kept = torch.zeros(1, 8, 8, dtype=torch.bool)
    kept[0, 3, 3] = kept[0, 0, 0] = True
    filled = impute(flat[None], kept, torch.Generator(), noise=0.0, solver=solver)[0]
    assert filled[0, 3, 3] == 1 and 0 < filled[0, 3, 4] < 1 and filled[0, 3, 4] > filled[0, 3, 7]


@SOLVERS
def test_imputation_equals_pytorch_grad_cams_with_the_same_noise(solver) -> None:
    torch.manual_seed(0)
    image = torch.rand(3, 24, 24)
    kept = kept_pixels(torch.rand(24, 24), 30)
    assert kept.double().mean() == pytest.approx(0.3, abs=1 / 576)  # the percentile is the share of pixels kept
    with torch.random.fork_rng():
        torch.manual_seed(7)
        expected = NoisyLinearImputer()(image, kept.float())  # SciPy's direct solve
    ours = impute(image[None], kept[None], torch.Generator().manual_seed(7), solver=solver)[0]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def proxy_target(proxy: torch.Tensor):
    """pytorch-grad-cam's callable target for one image's output: the clipped cosine to its proxy."""
    return lambda output: F.cosine_similarity(output, proxy, dim=-1).clamp_min(0)


@SOLVERS
@pytest.mark.parametrize("kind", ["class", "proxy"])
def test_road_equals_pytorch_grad_cams_metrics(kind: str, solver: str) -> None:
    """MoRF, LeRF and combined on the same maps, model and bounded score (softmax probability of the class;
    clipped cosine to a proxy, through pytorch-grad-cam's callable targets), pytorch-grad-cam drawing its noise
    from the global RNG seeded as our generator."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    images, maps = torch.rand(3, 3, 32, 32), torch.rand(3, 32, 32)
    rows = torch.tensor([0, 3, 1])
    if kind == "class":
        target = ClassLogits()
        pgc_targets = [ClassifierOutputSoftmaxTarget(int(r)) for r in rows]
    else:
        proxies = F.normalize(torch.randn(4, 5), dim=1)
        target = Proxies(proxies)
        pgc_targets = [proxy_target(proxies[r]) for r in rows]
    percentiles = [30, 70]

    def confidence(x: torch.Tensor) -> torch.Tensor:
        return target.confidence(model(x), rows)

    with torch.no_grad():
        base = confidence(images)
        morf, lerf = road(confidence, images, maps, base, torch.Generator().manual_seed(3), percentiles, solver)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        combined = ROADCombined(percentiles)(images, maps.numpy(), pgc_targets, model)
    with torch.random.fork_rng():
        torch.manual_seed(3)  # LeRF draws first in ROADCombined: our order
        expected_lerf = ROADLeastRelevantFirstAverage(percentiles)(images, maps.numpy(), pgc_targets, model)
        expected_morf = ROADMostRelevantFirstAverage(percentiles)(images, maps.numpy(), pgc_targets, model)
    np.testing.assert_allclose(morf.numpy(), expected_morf, atol=1e-5)
    np.testing.assert_allclose(lerf.numpy(), expected_lerf, atol=1e-5)
    np.testing.assert_allclose(((lerf - morf) / 2).numpy(), combined, atol=1e-5)
    assert not torch.allclose(morf, lerf)  # the two orders remove different pixels


def test_road_draws_only_from_its_generator() -> None:
    torch.manual_seed(0)
    images, maps = torch.rand(2, 3, 16, 16), torch.rand(2, 16, 16)
    score = lambda x: x.mean((1, 2, 3))  # noqa: E731
    state = torch.random.get_rng_state()
    first = road(score, images, maps, score(images), torch.Generator().manual_seed(1), [50])
    again = road(score, images, maps, score(images), torch.Generator().manual_seed(1), [50])
    other = road(score, images, maps, score(images), torch.Generator().manual_seed(2), [50])
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and not torch.equal(first[0], other[0])


def test_kept_pixels_equal_numpy_percentiles_with_ties() -> None:
    g = torch.Generator().manual_seed(4)
    maps = torch.cat([torch.rand(6, 17, 23, generator=g), (torch.rand(6, 17, 23, generator=g) * 4).round() / 4])
    for percentile in (0, 20, 33.3, 50, 80, 100):
        kept = kept_pixels(maps, percentile)
        expected = np.stack([m < np.percentile(m, percentile) for m in maps.numpy()])
        np.testing.assert_array_equal(kept.numpy(), expected)


def test_iterative_solve_at_128_px_equals_the_direct_solve() -> None:
    """Large removed blobs (a CAM's top 80%) at 128 px: the iterative solve against pytorch-grad-cam's SciPy one."""
    torch.manual_seed(0)
    image = torch.rand(3, 128, 128)
    cam = F.interpolate(torch.rand(1, 1, 7, 7), size=(128, 128), mode="bilinear")[0, 0]
    kept = kept_pixels(cam, 20)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        expected = NoisyLinearImputer()(image, kept.float())
    ours = impute(image[None], kept[None], torch.Generator().manual_seed(5), solver="iterative")[0]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@SOLVERS
def test_a_map_that_keeps_nothing_fills_with_noise_not_nan(solver) -> None:
    """A flat map keeps no pixel at any percentile: nothing anchors the system, and the fill is the noise alone."""
    images = torch.rand(2, 3, 12, 12)
    kept = kept_pixels(torch.ones(2, 12, 12), 40)
    assert not kept.any()
    filled = impute(images, kept, torch.Generator().manual_seed(0), solver=solver)
    assert torch.isfinite(filled).all() and filled.abs().max() < 0.1
