"""Plain nn.Module parts of the two models: a torchvision ResNet trunk and the pooled linear head both share.

The nets follow timm's split ``forward_features`` (trunk, ends at the CAM target layer) / ``forward_head``
(pool -> head), so a CAM can be computed either through the whole net or from stored feature maps alone.
"""

from __future__ import annotations

import socket
import urllib.error
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

ARCHS = ("resnet18", "resnet34", "resnet50")
# torchvision's recommended ImageNet weights per architecture (resnet50: IMAGENET1K_V2). Module-level so a test
# can point one at an unreachable address.
IMAGENET_URLS = {
    "resnet18": torchvision.models.ResNet18_Weights.DEFAULT.url,
    "resnet34": torchvision.models.ResNet34_Weights.DEFAULT.url,
    "resnet50": torchvision.models.ResNet50_Weights.DEFAULT.url,
}
DOWNLOAD_TIMEOUT_S = 20.0  # an unreachable host must fail fast, not hang on a TCP connect


def imagenet_state_dict(arch: str) -> dict[str, Tensor]:
    """torchvision's ImageNet weights for ``arch``, from the torch hub cache or downloaded into it."""
    url = IMAGENET_URLS[arch]
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # torch.hub's urlopen takes no timeout of its own
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True)
    except (urllib.error.URLError, OSError) as err:
        raise RuntimeError(
            f"could not download the ImageNet weights of {arch} from {url} ({err}). Without network access, fetch "
            f"that file elsewhere and pass weights_path=<file> (a torchvision state dict), put it in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}, or set pretrained=False."
        ) from err
    finally:
        socket.setdefaulttimeout(previous)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A torchvision-format state dict from a local file (tensors only: ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights_path {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"weights_path {path} holds a {type(state).__name__}, expected a state dict")
    return state


def dilate_last_stage(stage: nn.Sequential) -> None:
    """Trade the stage's stride 2 for dilation 2, in place: what torchvision's ``replace_stride_with_dilation`` does
    for Bottleneck blocks, done here by hand because torchvision's BasicBlock (resnet18/34) refuses dilation."""
    for conv in stage[0].modules():  # the first block keeps dilation 1 but stops striding (also its downsample)
        if isinstance(conv, nn.Conv2d) and conv.stride == (2, 2):
            conv.stride = (1, 1)
    for block in list(stage)[1:]:
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                conv.dilation, conv.padding = (2, 2), (2, 2)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without avgpool/fc; parameter names are torchvision's, so its state dicts load as is.

    ``output_stride=16`` dilates layer4 instead of striding it (common WSOL practice): 14x14 maps at 224 px, 8x8 at
    128 px, i.e. CAMs with twice the resolution for the same weights.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        pretrained: bool = False,
        weights_path: str | Path | None = None,
        output_stride: int = 32,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        if output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
        if pretrained and weights_path is not None:
            raise ValueError("give either pretrained=True or weights_path, not both")
        resnet = getattr(torchvision.models, arch)(weights=None)
        if output_stride == 16:
            dilate_last_stage(resnet.layer4)
        state = (
            load_state_dict_file(weights_path)
            if weights_path is not None
            else (imagenet_state_dict(arch) if pretrained else None)
        )
        if state is not None:
            missing, unexpected = resnet.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]  # a trunk-only file is fine
            if missing or unexpected:
                raise ValueError(
                    f"weights do not fit torchvision's {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.num_features: int = resnet.fc.in_features

    @property
    def cam_layer(self) -> nn.Module:
        """The last convolutional stage: the layer CAMs explain (a property, so it is not registered twice)."""
        return self.layer4

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class PooledLinearNet(nn.Module):
    """Backbone -> global average pool -> linear: the net of both modules, logits for the ``Classifier``
    (``out_features`` = classes) and the raw embedding ``y`` for the ``EmbeddingNet`` (``out_features`` = its
    dimension; not normalised).

    Why the embedding stays raw: everything that compares embeddings (the triplet loss and miner, retrieval, the
    proxies) L2-normalises them, so training sees the unit sphere either way, while EmbeddingCAM should score ``y``
    as GradCAM scores raw logits: ``y . p = |y| cos(y, p)`` has the gradient ``p``, which never vanishes, where the
    cosine's gradient goes to zero (and its direction to noise) as a confident image's cosine nears 1 (README,
    "What EmbeddingCAM scores").
    """

    def __init__(self, backbone: ResNetBackbone, out_features: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.num_features, out_features)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward_head(self, feature_maps: Tensor) -> Tensor:
        return self.fc(feature_maps.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
