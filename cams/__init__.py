"""cubcam's explanation engine: GradCAM and EmbeddingCAM for any PyTorch model (PyTorch, NumPy, SciPy only).

from cubcam.cams import GradCAM, EmbeddingCAM, normalized_mean_proxies, single_point_proxy, overlay
maps = GradCAM(model, "layer4")(images)              # [B, H, W] in [0, 1], predicted classes
maps = EmbeddingCAM(net, "layer4")(images, proxies)  # score <embedding, proxy>
maps = FinerCAM(model, "layer4")(images)             # what separates the class from its 3 nearest rivals
"""

from cubcam.cams import (
    _torchvision_guard,  # noqa: F401  (must run before anything imports torchvision)
    localization,
)
from cubcam.cams.engine import CAM, EmbeddingCAM, FinerCAM, GradCAM, minmax_normalize
from cubcam.cams.methods import METHODS, Method
from cubcam.cams.overlay import denormalize, overlay
from cubcam.cams.protocol import CAMModule, CAMStepOutput, Explanation, explain
from cubcam.cams.proxies import normalized_mean_proxies, single_point_proxy
from cubcam.cams.targets import ClassLogits, Kind, Proxies, Target

__all__ = [
    "CAM",
    "METHODS",
    "CAMModule",
    "CAMStepOutput",
    "ClassLogits",
    "EmbeddingCAM",
    "Explanation",
    "FinerCAM",
    "GradCAM",
    "Kind",
    "Method",
    "Proxies",
    "Target",
    "denormalize",
    "explain",
    "localization",
    "minmax_normalize",
    "normalized_mean_proxies",
    "overlay",
    "single_point_proxy",
]
