"""A pytorch-grad-cam user's first lines work as they expect: the context manager, ``cam.outputs``, one target for a
whole batch; and where cubcam differs from it on purpose (an IndexError is not swallowed; images 2..B get their
maps), the test says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cubcam.cams import GradCAM


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
