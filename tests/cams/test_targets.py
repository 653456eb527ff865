"""The one target factory (``cubcam.cams.targets.make_target``) that the callback, ``explain`` and ``evaluate`` call:
each proxy scheme against its definition, computed here by brute force, and the explanation step on it against the
engine run directly."""

from __future__ import annotations

import cubcam.cams  # noqa: F401  (the torchvision guard: before anything imports torchvision)

# isort: split

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cubcam.cams import EmbeddingCAM, normalized_mean_proxies
from cubcam.cams.protocol import HeadExplainer, explain, features_and_outputs
from cubcam.cams.targets import ClassLogits, Proxies, make_target, proxy_scheme

N, D, C = 12, 5, 3


@pytest.fixture
def reference() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=generator), torch.arange(N) % C


def test_gradcam_explains_class_logits() -> None:
    target = make_target("classifier")
    assert isinstance(target.target, ClassLogits) and target.scheme is None and not target.neighbours
    classes = torch.tensor([2, 0])
    assert torch.equal(target.rows(classes, torch.randn(2, 4)), classes)


def test_normalized_mean_is_the_renormalised_mean_of_unit_embeddings(reference) -> None:
    embeddings, labels = reference
    target = make_target("embedding", "normalized_mean", embeddings, labels, C)
    assert isinstance(target.target, Proxies)
    for c in range(C):
        unit = F.normalize(embeddings[labels == c], dim=1)
        torch.testing.assert_close(target.target.table[c], F.normalize(unit.mean(0), dim=0))
    classes = torch.tensor([1, 2])
    assert torch.equal(target.rows(classes, torch.randn(2, D)), classes)


def test_single_point_random_is_one_seeded_image_of_each_class(reference) -> None:
    embeddings, labels = reference
    first, again, other = (
        make_target("embedding", "single_point_random", embeddings, labels, C, seed=s) for s in (0, 0, 1)
    )
    unit = F.normalize(embeddings, dim=1)
    for c in range(C):
        row = first.target.table[c]
        matches = [i for i in range(N) if torch.allclose(unit[i], row)]
        assert len(matches) == 1 and labels[matches[0]] == c  # one image of its own class
    assert torch.equal(first.target.table, again.target.table)  # the seed decides the draw
    assert not torch.equal(first.target.table, other.target.table)
    # Class scores (and so the prediction) are the Normalized Mean Proxies' for every scheme.
    torch.testing.assert_close(first.target.classes, normalized_mean_proxies(embeddings, labels, C))


def test_single_point_nearest_is_the_most_similar_other_image(reference) -> None:
    embeddings, labels = reference
    index = torch.arange(100, 100 + N)  # dataset indices of the reference images
    target = make_target("embedding", "single_point_nearest", embeddings, labels, C, index=index)
    assert target.neighbours and torch.equal(target.reference_index, index)
    unit = F.normalize(embeddings, dim=1)
    cosine = unit @ unit.T
    expected = [max((j for j in range(N) if j != i), key=lambda j: cosine[i, j]) for i in range(N)]
    rows = target.rows(labels, embeddings, index)
    assert rows.tolist() == expected
    # An image that is not in the reference set may match any of it.
    assert target.rows(labels[:2], embeddings[:2]).tolist() == [0, 1]
    torch.testing.assert_close(target.target.table, unit)


def test_the_early_single_point_spelling_is_an_error_naming_both_schemes() -> None:
    with pytest.raises(ValueError, match="'single_point_nearest'.*'single_point_random'"):
        proxy_scheme("single_point")
    assert proxy_scheme("normalized_mean") == "normalized_mean"
    with pytest.raises(ValueError, match="proxy must be one of"):
        proxy_scheme("nearest")
    with pytest.raises(ValueError, match="proxy scheme must be one of"):
        make_target("embedding", "single_point", torch.randn(2, D), torch.zeros(2, dtype=torch.long))  # type: ignore[arg-type]


class Net(nn.Module):
    """A tiny embedding net that speaks the CAM protocol (a conv trunk, a pooled linear head)."""

    cam_kind = "embedding"
    cam_reshape = None

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1))
        self.fc = nn.Linear(8, D)

    @property
    def cam_target_layer(self) -> nn.Module:
        return self.trunk

    def forward_head(self, activations: torch.Tensor) -> torch.Tensor:
        return self.fc(activations.mean((2, 3)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.trunk(images))


def test_the_explanation_step_on_the_nearest_scheme_equals_the_engine_with_the_neighbours_embeddings() -> None:
    torch.manual_seed(0)
    net, images = Net().eval(), torch.randn(6, 3, 16, 16)
    features, outputs = features_and_outputs(net, images)
    labels, index = torch.arange(6) % 2, torch.arange(6)
    target = make_target("embedding", "single_point_nearest", outputs, labels, 2, index=index)
    step = explain(HeadExplainer(net), features, outputs, target, (16, 16), labels, index=index)
    unit = F.normalize(outputs, dim=1)
    assert (step.rows != index).all()  # never an image itself
    expected = EmbeddingCAM(net, net.trunk)(images, unit[step.rows])
    torch.testing.assert_close(step.maps, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(step.explained, labels)  # what the map explains by class: the true class
