"""Plain nn.Module parts of the two models: a trunk (torchvision's ResNets, or any timm model) and the pooled
linear head both share.

The nets follow timm's split ``forward_features`` (trunk, ends at the CAM target layer) / ``forward_head``
(the rest -> head), so a CAM can be computed either through the whole net or from stored activations alone.

Where the CAM layer sits, per kind of timm model (:class:`TimmBackbone`):

- CNNs (ResNet, ConvNeXt, EfficientNet, RegNet, ...): the output of timm's ``forward_features``, the last stage's
  map; the head is timm's ``forward_head`` (pool, and ConvNeXt's head norm).
- Swin-style models, whose ``forward_features`` is NHWC (``output_fmt``): the same output, permuted to NCHW for
  the map; the head pools it as timm does.
- Vision transformers with a class token (timm's ``VisionTransformer``: ViT, DeiT): the class token is all the
  head reads, so the last block's patch tokens get no gradient. The CAM layer is therefore the residual stream
  *entering* the last block (its patch tokens, class and register tokens dropped, laid out on the patch grid),
  and the head runs that last block, the final norm and timm's head. pytorch-grad-cam's usual choice,
  ``blocks[-1].norm1``, is the LayerNorm of this same stream; the stream itself is what a head-only pass can
  restart from (the block's residual needs it), so no second backbone pass is ever needed.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torchvision
from torch import Tensor, nn

from cubcam import CubcamWarning

ARCHS = ("resnet18", "resnet34", "resnet50")
# torchvision's recommended ImageNet weights per architecture (resnet50: IMAGENET1K_V2). Module-level so a test
# can point one at an unreachable address.
IMAGENET_URLS = {
    "resnet18": torchvision.models.ResNet18_Weights.DEFAULT.url,
    "resnet34": torchvision.models.ResNet34_Weights.DEFAULT.url,
    "resnet50": torchvision.models.ResNet50_Weights.DEFAULT.url,
}
DOWNLOAD_TIMEOUT_S = 20.0  # an unreachable host must fail fast, not hang on a TCP connect
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a hub repository
HF_HUB_ADDRESS = ("huggingface.co", 443)  # where timm's weights come from (module-level: a test points it elsewhere)


@dataclass(frozen=True)
class BackboneConfig:
    """The network arguments: what every trunk is built from. ``cubcam.train.modules.CUBModule`` takes the same
    names flat (the config keys users write, ``--model.init_args.arch``) and packs them into one of these.

    ``arch``: a torchvision ResNet name (``ARCHS``) or any timm model name; ``pretrained``: ImageNet weights
    (torchvision's, or timm's from the Hugging Face hub), ``weights_path`` a local file instead; ``output_stride``
    16 dilates the last stage where the model supports it; ``image_size``: the input size, for models whose patch
    grid is fixed when built (ViTs; the CLI links it to ``data.image_size``).

    Raises:
        ValueError: both ``pretrained`` and ``weights_path``.
    """

    arch: str = "resnet18"
    pretrained: bool = False
    weights_path: str | Path | None = None
    output_stride: int = 32
    image_size: int | None = None

    def __post_init__(self) -> None:
        if self.pretrained and self.weights_path is not None:
            raise ValueError("give either pretrained=True or weights_path, not both")


def imagenet_state_dict(arch: str) -> dict[str, Tensor]:
    """torchvision's ImageNet weights for ``arch``, from the torch hub cache or downloaded into it, once the host
    answers within ``DOWNLOAD_TIMEOUT_S`` (torch.hub's download takes no timeout of its own)."""
    url = IMAGENET_URLS[arch]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        if not (folder / Path(urllib.parse.urlparse(url).path).name).is_file():
            host = urllib.parse.urlparse(url).hostname or ""
            socket.create_connection((host, 443), timeout=DOWNLOAD_TIMEOUT_S).close()
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True)
    except (urllib.error.URLError, OSError) as err:
        raise RuntimeError(
            f"could not download the ImageNet weights of {arch} from {url} ({err}). Without network access, fetch "
            f"that file elsewhere and pass weights_path=<file> (a torchvision state dict), put it in {folder}, or "
            f"set pretrained=False."
        ) from err


def cached_weights(timm: Any, arch: str) -> str | None:
    """The file of ``arch``'s timm weights in the local Hugging Face cache (``huggingface_hub.try_to_load_from_cache``),
    or None where it is not there (or the model has no weights on the hub)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        repo = timm.models.get_pretrained_cfg(arch).hf_hub_id
    except (AttributeError, RuntimeError):  # no pretrained config for this name
        return None
    for file_name in HF_WEIGHT_FILES:
        found = try_to_load_from_cache(repo, file_name) if repo else None
        if isinstance(found, str):
            return found
    return None


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

    def __init__(self, config: BackboneConfig):
        super().__init__()
        arch, output_stride, weights_path = config.arch, config.output_stride, config.weights_path
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        if output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
        resnet = getattr(torchvision.models, arch)(weights=None)
        if output_stride == 16:
            dilate_last_stage(resnet.layer4)
        state = (
            load_state_dict_file(weights_path)
            if weights_path is not None
            else (imagenet_state_dict(arch) if config.pretrained else None)
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

    def pool(self, feature_maps: Tensor) -> Tensor:
        """Global average pool: [B, C, h, w] -> [B, C]."""
        return feature_maps.mean(dim=(2, 3))

    @property
    def reshape(self) -> None:
        """The CAM layer's output is a map already."""
        return None


TimmKind = Literal["nchw", "nhwc", "vit"]


class TimmBackbone(nn.Module):
    """Any timm model as a trunk (``num_classes=0``), with its CAM layer chosen from the model (module doc).

    ``config.arch`` is a timm model name (``timm.list_models()``); ``pretrained`` takes timm's weights (Hugging Face
    hub cache, downloaded on first use), ``weights_path`` a local ``.safetensors`` / ``.pth`` of that model instead
    (timm's ``pretrained_cfg_overlay``); ``output_stride`` 16 is passed where timm supports it (ResNets, ConvNeXt,
    RegNet, EfficientNet: dilated last stage), a model that does not (ViT, Swin) keeps its own, with one warning;
    ``image_size`` is passed to models whose patch grid is fixed at build time (ViT: ``img_size``).

    Raises:
        ValueError: an unknown ``arch``, a token model other than timm's ``VisionTransformer`` with a class-token
            head, or weights that cannot be read (the message names the file or the download).
    """

    def __init__(self, config: BackboneConfig):
        super().__init__()
        arch, pretrained, weights_path = config.arch, config.pretrained, config.weights_path
        import timm  # after cubcam.cams (the torchvision guard): timm imports torchvision
        from timm.models.vision_transformer import VisionTransformer

        if not timm.is_model(arch):
            raise ValueError(
                f"arch {arch!r} is neither a torchvision ResNet {ARCHS} nor a timm model (see timm.list_models())"
            )
        kwargs: dict[str, object] = {"num_classes": 0}
        if weights_path is not None:
            if not Path(weights_path).is_file():
                raise FileNotFoundError(f"weights_path {weights_path} does not exist")
            kwargs |= {"pretrained": True, "pretrained_cfg_overlay": {"file": str(weights_path)}}
        elif pretrained:
            kwargs["pretrained"] = True
        if pretrained:
            self.model = self._from_hub(timm, config, kwargs)
        else:
            self.model = self._create(timm, config, kwargs)
        if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
            self.kind: TimmKind = "nhwc"
        elif isinstance(self.model, VisionTransformer) and self.model.global_pool == "token":
            self.kind = "vit"
        elif hasattr(self.model, "patch_embed") or hasattr(self.model, "blocks"):
            raise ValueError(
                f"{arch}: of the token models, timm's VisionTransformer (ViT, DeiT) with a class-token head and "
                f"NHWC models such as Swin are supported; this one is neither"
            )
        else:
            self.kind = "nchw"
        self.num_features = int(cast(int, self.model.num_features))
        self.cam_output = nn.Identity()  # the CAM layer: its output is what forward returns

    @classmethod
    def _from_hub(cls, timm: Any, config: BackboneConfig, kwargs: dict[str, object]) -> nn.Module:
        """timm's pretrained weights: the file in the local Hugging Face cache if it is there, else downloaded, but
        only once the hub answers within ``DOWNLOAD_TIMEOUT_S`` (the hub client itself retries for a minute)."""
        from huggingface_hub import constants

        cached = cached_weights(timm, config.arch)
        if cached is not None:
            return cls._create(timm, config, {**kwargs, "pretrained_cfg_overlay": {"file": cached}})
        try:
            socket.create_connection(HF_HUB_ADDRESS, timeout=DOWNLOAD_TIMEOUT_S).close()
        except OSError as err:
            raise RuntimeError(
                f"could not download the timm weights of {config.arch}: the Hugging Face hub ({HF_HUB_ADDRESS[0]}) is "
                f"unreachable ({err}) and they are not in the local cache ({constants.HF_HUB_CACHE}). Without "
                f"network access, fetch them elsewhere and pass weights_path=<file> (.safetensors or .pth), or set "
                f"pretrained=False."
            ) from err
        return cls._create(timm, config, kwargs)

    @staticmethod
    def _create(timm: Any, config: BackboneConfig, kwargs: dict[str, object]) -> nn.Module:
        """timm's model, with ``output_stride`` and ``img_size`` passed where the model takes them (a model that
        does not raises a TypeError naming the argument: it is dropped and the model built again)."""
        create: Callable[..., nn.Module] = timm.create_model
        arch, output_stride = config.arch, config.output_stride
        extra: dict[str, object] = {}
        if output_stride != 32:
            extra["output_stride"] = output_stride
        if config.image_size is not None:
            extra["img_size"] = config.image_size
        while True:
            try:
                return create(arch, **kwargs, **extra)
            except TypeError as err:
                unknown = [name for name in extra if name in str(err)]
                if not unknown:
                    raise
                if unknown[0] == "output_stride":
                    warnings.warn(
                        f"{arch} does not support output_stride={output_stride}; it keeps its own",
                        CubcamWarning,
                        stacklevel=4,
                    )
                extra.pop(unknown[0])
            except (OSError, RuntimeError) as err:  # no network, or a file that does not fit
                raise RuntimeError(
                    f"could not load the weights of {arch} ({one_line_of(err)}). Without network access, download "
                    f"them elsewhere and pass weights_path=<file> (.safetensors or .pth), or set pretrained=False."
                ) from err

    @property
    def cam_layer(self) -> nn.Module:
        """The identity that ``forward`` ends with: its output is the CAM layer's activations."""
        return self.cam_output

    def forward(self, x: Tensor) -> Tensor:
        """The CAM layer's activations: a map [B, C, h, w], NHWC maps [B, h, w, C], or ViT tokens [B, N, D]."""
        model: Any = self.model  # timm's public API, untyped
        if self.kind != "vit":
            return self.cam_output(model.forward_features(x))
        # The residual stream entering the last block, all tokens (prefix first), through timm's public API;
        # stop_early: the last block runs in pool(), not here.
        [(patches, prefix)] = model.forward_intermediates(
            x,
            indices=[len(model.blocks) - 2],
            output_fmt="NLC",
            return_prefix_tokens=True,
            intermediates_only=True,
            stop_early=True,
        )
        return self.cam_output(torch.cat([prefix, patches], dim=1))

    def pool(self, activations: Tensor) -> Tensor:
        """From the CAM layer's activations to the pooled features [B, num_features] (the rest of the trunk)."""
        model: Any = self.model
        if self.kind == "vit":
            activations = model.norm(model.blocks[-1](activations))
        return model.forward_head(activations, pre_logits=True)

    @property
    def reshape(self) -> Callable[[Tensor], Tensor] | None:
        """How the CAM layer's output becomes a map [B, K, h, w] (``cubcam.cams.engine.Reshape``)."""
        model: Any = self.model
        if self.kind == "nhwc":
            return nhwc_to_nchw
        if self.kind == "vit":
            h, w = model.patch_embed.grid_size
            return TokenGrid(int(model.num_prefix_tokens), (int(h), int(w)))
        return None


def nhwc_to_nchw(maps: Tensor) -> Tensor:
    return maps.permute(0, 3, 1, 2)


class TokenGrid:
    """ViT tokens [B, prefix + h * w, D] -> the patch tokens on their grid [B, D, h, w] (class and register
    tokens dropped), pytorch-grad-cam's ``reshape_transform`` for ViTs."""

    def __init__(self, prefix: int, grid: tuple[int, int]):
        self.prefix, self.grid = prefix, grid

    def __call__(self, tokens: Tensor) -> Tensor:
        patches = tokens[:, self.prefix :]
        h, w = self.grid
        if patches.shape[1] != h * w:
            raise ValueError(
                f"{patches.shape[1]} patch tokens do not fill the {h}x{w} grid this ViT was built for: build it "
                f"with the size it is fed (image_size in the modules; the CLI links it to data.image_size)"
            )
        return patches.reshape(len(patches), h, w, -1).permute(0, 3, 1, 2)


def one_line_of(err: BaseException) -> str:
    line = " ".join(str(err).split())
    return line if len(line) <= 200 else line[:197] + "..."


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

    def __init__(self, backbone: ResNetBackbone | TimmBackbone, out_features: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.num_features, out_features)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward_head(self, activations: Tensor) -> Tensor:
        return self.fc(self.backbone.pool(activations))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def build_backbone(config: BackboneConfig) -> ResNetBackbone | TimmBackbone:
    """torchvision's ResNet for the names in ``ARCHS`` (the parameter names of older checkpoints), timm for any
    other name."""
    return ResNetBackbone(config) if config.arch in ARCHS else TimmBackbone(config)
