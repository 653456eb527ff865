"""A pytorch-grad-cam user's first lines work as they expect: the context manager, ``cam.outputs``, one target for a
whole batch, ``aug_smooth`` and ``eigen_smooth``; and where cubcam differs from it on purpose (an IndexError is not
swallowed; images 2..B get their maps; the SVD's sign), the test says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nets import corr
from test_methods import GRADIENT_METHODS, _pgc_class

from cubcam.cams import GradCAM
from cubcam.cams.gradient_free import eigen_projection


def test_the_context_manager_and_outputs_as_pytorch_grad_cam_has_them(net, images):
    from pytorch_grad_cam import GradCAM as TheirGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = [ClassifierOutputTarget(t) for t in (4, 0, 2, 1)]
    with GradCAM(model=net, target_layers=[net.features]) as cam:
        ours = cam(input_tensor=images, targets=targets)
        with torch.no_grad():
            torch.testing.assert_close(cam.outputs, net(images))  # the logits of the images explained
    with TheirGradCAM(model=net, target_layers=[net.features]) as cam:
        theirs = cam(input_tensor=images, targets=targets)
        np.testing.assert_allclose(cam.outputs.detach().numpy(), net(images).detach().numpy(), atol=1e-5)
    assert np.abs(ours.numpy() - theirs).max() < 1e-2

    with pytest.raises(IndexError), GradCAM(model=net, target_layers=[net.features]):  # pgc's __exit__ swallows it
        raise IndexError("not swallowed")


def test_one_target_is_every_image_s_and_other_counts_are_one_error(net, images):
    from pytorch_grad_cam import GradCAM as TheirGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    ours = GradCAM(net, "features")(images, [ClassifierOutputTarget(2)])
    torch.testing.assert_close(ours, GradCAM(net, "features")(images, torch.full((4,), 2)))
    assert all(bool((cam > 0).any()) for cam in ours)
    with TheirGradCAM(model=net, target_layers=[net.features]) as cam:  # the difference, documented
        theirs = cam(input_tensor=images, targets=[ClassifierOutputTarget(2)])
    assert np.abs(theirs[0] - ours[0].numpy()).max() < 1e-2 and not theirs[1:].any()
    with pytest.raises(ValueError, match="got 3 targets for 4 images: give one per image, or one for the whole batch"):
        GradCAM(net, "features")(images, [ClassifierOutputTarget(c) for c in (1, 2, 3)])


def test_eigen_smooth_matches_pytorch_grad_cam_up_to_the_svd_sign(net, images):
    """The first principal component of the weighted activations; pytorch-grad-cam keeps whichever sign NumPy's
    SVD returns, cubcam the one EigenCAM keeps. The projections are equal up to sign; the maps are equal where the
    signs agree, and where they do not pytorch-grad-cam's is the ReLU of the negated projection (anti-correlated)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    a = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    signed, reference = eigen_projection(a), get_2d_projection(a.numpy())
    assert all(min(np.abs(s - r).max(), np.abs(s + r).max()) < 1e-4 for s, r in zip(signed.numpy(), reference))
    targets, equal = [4, 0, 2, 1], 0
    for method in GRADIENT_METHODS:
        ours = GradCAM(net, "features", method=method)(images, torch.tensor(targets), eigen_smooth=True).numpy()
        with _pgc_class(method)(model=net, target_layers=[net.features]) as cam:
            theirs = cam(images, [ClassifierOutputTarget(t) for t in targets], eigen_smooth=True)
        for mine, their in zip(ours, theirs):
            same = np.abs(mine - their).max() < 1e-2
            equal += same
            assert same or np.corrcoef(mine.ravel(), their.ravel())[0, 1] < 0, method
        plain = GradCAM(net, "features", method=method)(images, torch.tensor(targets)).numpy()
        assert np.abs(plain - ours).max() > 1e-2, method  # it changed something
    assert equal >= 4  # the signs agree on several (method, image) pairs: the maps are then equal


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_aug_smooth_matches_pytorch_grad_cam(net, images, method):
    """Six views (the images and their mirror images, times 0.9, 1 and 1.1), each map turned back, averaged; cubcam
    imports no ttach."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = [4, 0, 2, 1]
    ours = GradCAM(net, "features", method=method)(images, torch.tensor(targets), aug_smooth=True).numpy()
    with _pgc_class(method)(model=net, target_layers=[net.features]) as cam:
        theirs = cam(images, [ClassifierOutputTarget(t) for t in targets], aug_smooth=True)
    assert np.abs(ours - theirs).max() < 1e-2 and corr(ours, theirs) > 0.999
    plain = GradCAM(net, "features", method=method)(images, torch.tensor(targets)).numpy()
    assert np.abs(plain - ours).max() > 1e-2  # it changed something
    with pytest.raises(ValueError, match="aug_smooth flips and scales the images"):
        GradCAM(net.forward_head, None)(net.forward_features(images).detach(), 1, aug_smooth=True)
    with pytest.raises(ValueError, match="eigen_smooth takes the first principal component"):
        GradCAM(net, "features", method="eigencam")(images, 1, eigen_smooth=True)
