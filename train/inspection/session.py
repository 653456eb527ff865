"""What ``cubcam explain`` and ``cubcam evaluate`` share: one set of options and one start-up.

Both open a checkpoint, find the data it was trained on (its root, split settings and image size), check that the
model kind it holds, and, for an embedding net, build its reference set and the explanation target from it
through the one target factory (``cubcam.cams.targets.make_target``). Every failure there is one line naming the
problem and exit status 2 (:func:`fail`).
"""

from __future__ import annotations

import argparse
import netrc
import os
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from cubcam.cams.engine import DEFAULT_CHANNEL_BATCH
from cubcam.cams.targets import FINER_RIVALS, ExplanationTarget, Kind, ProxyScheme, make_target
from cubcam.train.data.cub import SPLITS, CUBDataset, SplitSettings
from cubcam.train.data.presets import EvalPreset
from cubcam.train.inspection.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint, one_line
from cubcam.train.inspection.reference import ReferenceSet, reference_set, reference_split

START_ERRORS = (CheckpointError, FileNotFoundError, ValueError)  # what the start-up turns into one line


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (``--num 0`` would explain nothing and say nothing)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_finer_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--finer [RIVALS]``, Finer-CAM in either tool (0: off); ``what`` says what it adds there."""
    parser.add_argument(
        "--finer",
        type=positive_int,
        nargs="?",
        const=FINER_RIVALS,
        default=0,
        metavar="RIVALS",
        help=f"{what} (RIVALS: how many of the most similar classes each class is set against, default "
        f"{FINER_RIVALS}; an embedding net's: the nearest class proxies)",
    )


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """The options both tools take, with one default each."""
    parser.add_argument("checkpoint", type=Path, help="a Lightning checkpoint of a cubcam Classifier or EmbeddingNet")
    parser.add_argument(
        "--target",
        choices=("true", "predicted"),
        default="true",
        help="class whose map is made and scored; your own images have no label and always use the predicted class",
    )
    parser.add_argument(
        "--data.root", dest="data_root", default=None, help="dataset root (default: the one saved in the checkpoint)"
    )
    parser.add_argument("--data.split_scheme", dest="split_scheme", choices=("official", "zero_shot"), default=None)
    parser.add_argument(
        "--reference-split",
        choices=SPLITS,
        default=None,
        help="embedding nets: split whose embeddings give the proxies and the retrieval gallery (default: train; in "
        "the zero_shot scheme the explained split, val or test)",
    )
    parser.add_argument(
        "--image-size", type=positive_int, default=None, help="default: the checkpoint's data.image_size"
    )
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument(
        "--channel-batch-size",
        type=positive_int,
        default=DEFAULT_CHANNEL_BATCH,
        help="ScoreCAM's and AblationCAM's (image, channel) pairs per forward (default %(default)s; a GPU takes "
        "hundreds)",
    )
    parser.add_argument("--num-workers", type=non_negative_int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--seed", type=int, default=0, help="draws the single-point proxy of each class (and evaluate's random maps)"
    )
    parser.add_argument("--no-cache", action="store_true", help="recompute the reference embeddings")
    parser.add_argument(
        "--wandb",
        nargs="?",
        const="cubcam",
        default=None,
        metavar="PROJECT",
        help="also log the results to a W&B run of PROJECT (default cubcam; WANDB_MODE=offline works)",
    )


@dataclass
class Session:
    """An opened checkpoint with its data settings: what both tools work from."""

    ckpt: LoadedCheckpoint
    kind: Kind  # the checkpoint's model kind
    root: str | None  # the dataset root (None: none saved and none given)
    settings: SplitSettings
    image_size: int
    device: torch.device
    args: argparse.Namespace

    @property
    def preset(self) -> EvalPreset:
        return EvalPreset(self.image_size)

    def dataset(self, split: str) -> CUBDataset:
        """A split of the checkpoint's data, through the evaluation preset."""
        return CUBDataset(self.data_root(f"the {split} split"), split=split, transform=self.preset, **self.settings)

    def data_root(self, needed_by: str) -> str:
        """The dataset root, or one line saying what needs it and that it is not there."""
        if self.root is None or not Path(self.root).exists():
            raise CheckpointError(
                f"{needed_by} needs the dataset, but {self.root or 'no data root saved in the checkpoint'} does not "
                f"exist; pass --data.root"
            )
        return self.root

    def reference(self, explained: str) -> ReferenceSet | None:
        """The embedding net's reference set for images of split ``explained`` (cached beside the checkpoint); a
        classifier needs none."""
        if self.kind != "embedding":
            return None
        args = self.args
        return reference_set(
            self.ckpt.module,
            self.ckpt.path,
            self.data_root("an embedding net's class proxies (its reference split)"),
            split=reference_split(self.settings["split_scheme"], args.reference_split, explained),
            settings=self.settings,
            image_size=self.image_size,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=self.device,
            cache=not args.no_cache,
        )

    def target(self, scheme: ProxyScheme, reference: ReferenceSet | None, explained: str) -> ExplanationTarget:
        """The explanation target: class logits, or ``scheme``'s proxies from ``reference`` (whose images, when it
        is the explained split itself, are never their own nearest neighbour)."""
        if reference is None:
            return make_target("classifier")
        same = reference.split == explained
        return make_target(
            "embedding",
            scheme,
            reference.embeddings,
            reference.labels,
            reference.num_classes,
            seed=self.args.seed,
            index=torch.arange(len(reference.labels)) if same else None,
        )


def start(args: argparse.Namespace) -> Session:
    """Open the checkpoint of ``args`` (the common options). Raises one of ``START_ERRORS``."""
    if args.wandb and not os.environ.get("WANDB_MODE") and not wandb_key_known():
        # Decided now, not when the results are logged minutes later (W&B would stop there to ask for a key).
        os.environ["WANDB_MODE"] = "offline"
        print("note: no W&B API key here (WANDB_API_KEY, ~/.netrc): --wandb logs offline; `wandb sync` uploads later")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this machine has no CUDA device torch can use; pass --device cpu")
    ckpt = load_checkpoint(args.checkpoint, map_location=device)
    return Session(
        ckpt=ckpt,
        kind=ckpt.module.cam_kind,
        root=args.data_root or ckpt.data_hparams.get("root"),
        settings=ckpt.split_settings(args.split_scheme),
        image_size=args.image_size or ckpt.image_size,
        device=device,
        args=args,
    )


def wandb_key_known() -> bool:
    """Whether W&B has an API key to log online with: ``WANDB_API_KEY``, or a ``~/.netrc`` entry for its host (what
    ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def fail(message: object) -> NoReturn:
    """One line on stderr, exit status 2: how both tools end on bad input."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(2)
