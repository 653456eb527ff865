"""CUB-200-2011 read from its own file layout, with every consistency check that keeps a label honest.

Splits: ``official`` uses ``train_test_split.txt`` (classification); ``zero_shot`` trains on the first half of the
classes and tests on the second (CUB: classes 1-100 / 101-200, the metric-learning standard; a dataset with C
classes splits at C // 2). Labels are 0-based indices into the split's ``class_names``: in the zero-shot test split
they are re-based, so its first class (CUB's 101) is label 0.

CUB has no validation split, so ``val_fraction`` carves one out of the training data, drawn with ``seed`` (the same
arguments always give the same split): in ``official``, that share of every class's training images (stratified,
at least one image of a class with two or more); in ``zero_shot``, that share of the training *classes*, with all
their images (class-disjoint, as in Musgrave et al. 2020, "A Metric Learning Reality Check"). The ``train`` split
is then what remains; ``test`` never changes. With ``val_fraction`` 0 there is no ``val`` split.

Images are checked when the dataset is built (each file's header is read: a missing file, an empty one or one that
is no image, such as an HTML error page saved under a ``.jpg`` name, fails then) and decoded when a sample is read
(a truncated file fails then); both errors are :class:`BadImage`, naming the file and ``skip_bad_images``. With
``skip_bad_images=True`` every image of the split is decoded once up front (JPEGs at 1/8 scale: a few seconds for all
of CUB), the unreadable ones are dropped and one warning gives their count.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypedDict, overload

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from cubcam import CubcamWarning
from cubcam.cams.localization import check_boxes
from cubcam.cams.protocol import Sample
from cubcam.train.data.presets import MEAN, PART_NAMES, STD, load_rgb, to_tensor

SPLITS = ("train", "val", "test")
SPLIT_SCHEMES = ("official", "zero_shot")
FOLDER = "CUB_200_2011"
LAYOUT = f"""{FOLDER}/
    images.txt  image_class_labels.txt  train_test_split.txt  classes.txt  bounding_boxes.txt
    parts/parts.txt  parts/part_locs.txt
    images/<class folder>/<file>.jpg"""
HOW_TO_GET_IT = (
    "Get it with `download: true` in the data config (fetches CUB_200_2011.tgz, 1.1 GB, from Caltech), "
    "point `root` (or $CUB_ROOT for demo.sh) at an existing copy, or write the synthetic stand-in with "
    "`python -m cubcam.train.data.synthetic --out data/synthetic_cub`."
)


class SplitSettings(TypedDict):
    """How a dataset is cut into train / val / test: what a checkpoint's datamodule saved, so that ``explain`` and
    ``evaluate`` rebuild the very splits the model was trained and selected on."""

    split_scheme: str
    val_fraction: float
    seed: int


Transform = Callable[[Image.Image, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


class DatasetNotFound(FileNotFoundError):
    """No CUB-format dataset where the settings point (its message names the layout and how to get it): a user's
    setting to fix, which ``cubcam`` reports in its own words, without a traceback."""


class BadImage(OSError):
    """An image file of the dataset that is missing or does not decode: its message names the file and
    ``skip_bad_images``, which leaves such files out; ``cubcam`` reports it in one line."""


SKIP_HINT = "--data.skip_bad_images true (skip_bad_images=True) leaves out the images that do not read"


def find_root(root: str | Path) -> Path:
    """The ``CUB_200_2011`` folder: ``root`` itself or its child of that name."""
    root = Path(root).expanduser()
    for candidate in (root / FOLDER, root):
        if (candidate / "images.txt").is_file():
            return candidate
    raise DatasetNotFound(
        f"no CUB-200-2011 dataset at {root}: expected {root / FOLDER}/images.txt or "
        f"{root}/images.txt, in this layout:\n{LAYOUT}\n{HOW_TO_GET_IT}"
    )


@overload
def _rows(path: Path, columns: int, numeric: Literal[True] = True) -> np.ndarray: ...


@overload
def _rows(path: Path, columns: int, numeric: Literal[False]) -> list[list[Any]]: ...


def _rows(path: Path, columns: int, numeric: bool = True) -> list[list[Any]] | np.ndarray:
    """One of CUB's space-separated files: ``columns`` fields a line (an id, then numbers as a float array
    [N, columns], or one string that may contain spaces), with an error naming the file and line if malformed."""
    if not path.is_file():
        raise DatasetNotFound(f"{path} is missing: a CUB-200-2011 folder holds\n{LAYOUT}")
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if numeric:  # fast path (part_locs.txt has 177k lines); the loop below only runs to name a bad line
        try:
            table = np.array(" ".join(line for _, line in lines).split(), dtype=np.float64)
            if table.size == columns * len(lines):
                return table.reshape(len(lines), columns)
        except ValueError:
            pass
    rows = []
    for number, line in lines:
        fields = line.split() if numeric else line.split(maxsplit=columns - 1)
        try:
            if len(fields) != columns:
                raise ValueError(f"expected {columns} fields, found {len(fields)}")
            rows.append([int(fields[0])] + [float(f) if numeric else f for f in fields[1:]])
        except ValueError as err:
            raise ValueError(f"{path}, line {number}: cannot parse {line!r} ({err})") from None
    return np.array(rows, dtype=np.float64).reshape(-1, columns) if numeric else rows


def read_class_folders(root: Path) -> list[str]:
    """``classes.txt``: folder names such as ``001.Black_footed_Albatross``, in class-id order (ids 1..C)."""
    rows = _rows(root / "classes.txt", 2, numeric=False)
    if [r[0] for r in rows] != list(range(1, len(rows) + 1)):
        raise ValueError(f"{root / 'classes.txt'}: class ids must be 1..{len(rows)} in order")
    return [r[1] for r in rows]


def human_name(folder: str) -> str:
    """``001.Black_footed_Albatross`` -> ``Black footed Albatross``."""
    return folder.split(".", 1)[-1].replace("_", " ")


def split_class_ids(
    num_classes: int, split: str, split_scheme: str, val_fraction: float = 0.0, seed: int = 0
) -> list[int]:
    """The 1-based class ids a split holds, in label order."""
    if split not in SPLITS or split_scheme not in SPLIT_SCHEMES:
        raise ValueError(
            f"split must be one of {SPLITS} and split_scheme one of {SPLIT_SCHEMES}, got {split!r}, {split_scheme!r}"
        )
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if split == "val" and val_fraction == 0:
        raise ValueError("there is no val split: val_fraction is 0 (the data was split into train and test only)")
    if split_scheme == "official":
        return list(range(1, num_classes + 1))
    half = num_classes // 2
    if split == "test":
        return list(range(half + 1, num_classes + 1))
    held_out = set(held_out_classes(half, val_fraction, seed))
    return [c for c in range(1, half + 1) if (c in held_out) == (split == "val")]


def held_out_classes(num_train_classes: int, val_fraction: float, seed: int) -> list[int]:
    """The zero-shot validation classes: ``round(val_fraction * n)`` of the training classes 1..n (at least one,
    and never all), drawn with ``seed``, sorted."""
    if val_fraction == 0:
        return []
    count = min(max(1, round(val_fraction * num_train_classes)), num_train_classes - 1)
    rng = np.random.default_rng([seed, num_train_classes])
    return sorted(int(c) + 1 for c in rng.choice(num_train_classes, size=count, replace=False))


def held_out_images(image_ids_by_class: dict[int, list[int]], val_fraction: float, seed: int) -> set[int]:
    """The official scheme's validation images: of every class's training images, ``round(val_fraction * n)``
    (at least one of a class with two or more, never all), drawn per class with (``seed``, class id)."""
    held: set[int] = set()
    if val_fraction == 0:
        return held
    for class_id, ids in image_ids_by_class.items():
        if len(ids) < 2:
            continue
        count = min(max(1, round(val_fraction * len(ids))), len(ids) - 1)
        rng = np.random.default_rng([seed, class_id])
        held.update(int(i) for i in rng.choice(sorted(ids), size=count, replace=False))
    return held


def split_class_names(
    root: str | Path, split: str = "train", split_scheme: str = "official", val_fraction: float = 0.0, seed: int = 0
) -> list[str]:
    """The human class names of a split (indexed by label), from ``classes.txt`` alone."""
    folders = read_class_folders(find_root(root))
    ids = split_class_ids(len(folders), split, split_scheme, val_fraction, seed)
    return [human_name(folders[c - 1]) for c in ids]


class CUBDataset(Dataset):
    """CUB-200-2011 (or the synthetic stand-in) in its own file layout.

    ``ds[i]`` is a dict: ``image`` float Tensor[3, H, W] (normalised with ``mean``/``std``), ``label`` int,
    ``box`` float Tensor[4] (x, y, w, h) and ``parts`` float Tensor[15, 3] (x, y, visible; invisible = 0, 0, 0),
    both in the transformed image's pixels, ``image_id`` (CUB's) and ``index`` (= i). Without a transform the
    image keeps its size and is only normalised with ImageNet's statistics.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        split_scheme: str = "official",
        transform: Transform | None = None,
        skip_bad_images: bool = False,
        val_fraction: float = 0.0,
        seed: int = 0,
    ):
        self.root = find_root(root)
        self.split, self.split_scheme, self.transform = split, split_scheme, transform
        self.val_fraction, self.seed = val_fraction, seed
        self.mean = tuple(getattr(transform, "mean", MEAN))
        self.std = tuple(getattr(transform, "std", STD))
        folders = read_class_folders(self.root)
        class_ids = split_class_ids(len(folders), split, split_scheme, val_fraction, seed)
        self.class_names = [human_name(folders[c - 1]) for c in class_ids]
        label_of_class = {c: label for label, c in enumerate(class_ids)}

        table = self._read_tables(folders)
        wanted = [
            i
            for i, (_, class_id, is_train) in table["images"].items()
            if class_id in label_of_class and (split_scheme == "zero_shot" or is_train == (split != "test"))
        ]
        if split_scheme == "official" and split != "test" and val_fraction > 0:
            by_class: dict[int, list[int]] = {}
            for i in wanted:
                by_class.setdefault(table["images"][i][1], []).append(i)
            held = held_out_images(by_class, val_fraction, seed)
            wanted = [i for i in wanted if (i in held) == (split == "val")]
        paths = {i: self.root / "images" / table["images"][i][0] for i in wanted}
        bad, sizes = self._probe_images(paths, check_decoding=skip_bad_images)
        if bad and not skip_bad_images:
            first = next(iter(bad.items()))
            raise BadImage(
                f"{len(bad)} image file(s) of the {split} split are missing, empty or not images, e.g. {first[0]} "
                f"(image id {first[1]}): restore them, or {SKIP_HINT}"
            )
        if bad:
            warnings.warn(
                f"skipped {len(bad)} unreadable image(s) of {len(wanted)} in the {split} split of "
                f"{self.root}, e.g. {next(iter(bad))}",
                CubcamWarning,
                stacklevel=2,
            )
            wanted = [i for i in wanted if paths[i] not in bad]
        if not wanted:
            raise ValueError(f"the {split} split ({split_scheme}) of {self.root} holds no images")

        self.image_ids = wanted
        self._paths = [paths[i] for i in wanted]
        self.labels = [label_of_class[table["images"][i][1]] for i in wanted]
        self._boxes = self._checked_boxes(wanted, table["boxes"], sizes)
        self._parts = torch.zeros(len(wanted), len(PART_NAMES), 3)
        locs = table["parts"]
        row_of = torch.full((max(table["images"]) + 1,), -1, dtype=torch.long)
        row_of[wanted] = torch.arange(len(wanted))
        rows = row_of[locs[:, 0].long()]
        keep = (rows >= 0) & (locs[:, 4] > 0)
        self._parts[rows[keep], locs[keep, 1].long() - 1] = torch.cat(
            [locs[keep, 2:4].float(), torch.ones(int(keep.sum()), 1)], 1
        )

    def _read_tables(self, folders: list[str]) -> dict[str, Any]:
        """Join CUB's files on image id; an id missing from one of them, a label outside ``classes.txt`` or an image
        stored under another class's folder is an error: nothing gets silently mislabelled."""
        root = self.root
        paths = {r[0]: r[1] for r in _rows(root / "images.txt", 2, numeric=False)}
        tables = {
            name: {int(r[0]): r[1:].tolist() for r in _rows(root / name, columns)}
            for name, columns in (("image_class_labels.txt", 2), ("train_test_split.txt", 2), ("bounding_boxes.txt", 5))
        }
        for name, table in tables.items():
            if table.keys() != paths.keys():
                missing = sorted(paths.keys() - table.keys()) or sorted(table.keys() - paths.keys())
                raise ValueError(
                    f"{root / name} and {root / 'images.txt'} list different image ids (e.g. {missing[:5]})"
                )
        part_names = [r[1] for r in _rows(root / "parts" / "parts.txt", 2, numeric=False)]
        if part_names != list(PART_NAMES):
            raise ValueError(f"{root / 'parts' / 'parts.txt'} must list CUB's 15 parts {PART_NAMES}, got {part_names}")
        parts = torch.from_numpy(_rows(root / "parts" / "part_locs.txt", 5))  # image id, part id, x, y, visible
        if not (
            torch.isin(parts[:, 1], torch.arange(1.0, len(PART_NAMES) + 1)).all()
            and torch.isin(parts[:, 0], torch.tensor(list(paths), dtype=parts.dtype)).all()
        ):
            raise ValueError(f"{root / 'parts' / 'part_locs.txt'} refers to unknown images or parts")

        images = {}
        for image_id, path in paths.items():
            class_id = int(tables["image_class_labels.txt"][image_id][0])
            if not 1 <= class_id <= len(folders):
                raise ValueError(
                    f"{root / 'image_class_labels.txt'}: image {image_id} has class {class_id}, but "
                    f"classes.txt lists classes 1..{len(folders)}"
                )
            if path.split("/", 1)[0] != folders[class_id - 1]:
                raise ValueError(
                    f"image {image_id} ({path}) is labelled class {class_id} ({folders[class_id - 1]}) "
                    f"in image_class_labels.txt but stored in another class's folder"
                )
            images[image_id] = (path, class_id, bool(tables["train_test_split.txt"][image_id][0]))
        return {"images": images, "boxes": tables["bounding_boxes.txt"], "parts": parts}

    @staticmethod
    def _probe_images(
        paths: dict[int, Path], check_decoding: bool
    ) -> tuple[dict[Path, int], dict[int, tuple[int, int]]]:
        """({path: image id} of the images that are missing (or, with ``check_decoding``, cannot be decoded),
        {image id: (width, height)} of those whose header reads: the boxes are checked against them)."""
        with ThreadPoolExecutor(max_workers=8) as pool:  # Pillow's decoder and stat() release the GIL
            probed = list(pool.map(lambda path: _probe(path, check_decoding), paths.values()))
        bad = {path: image_id for (image_id, path), (ok, _) in zip(paths.items(), probed) if not ok}
        sizes = {image_id: size for image_id, (_, size) in zip(paths, probed) if size is not None}
        return bad, sizes

    def _checked_boxes(
        self, wanted: list[int], boxes: dict[int, list[float]], sizes: dict[int, tuple[int, int]]
    ) -> torch.Tensor:
        """The boxes of ``wanted`` clipped to their images (one warning counts them); a box that is not finite, or
        of no size, or outside its image, is an error naming the file, its line and the image id."""
        unknown = (math.inf, math.inf)  # an image whose header does not read fails when it is loaded
        clipped, valid, was_clipped = check_boxes(
            torch.tensor([boxes[i] for i in wanted], dtype=torch.float64).reshape(-1, 4),
            torch.tensor([sizes.get(i, unknown) for i in wanted], dtype=torch.float64).reshape(-1, 2),
        )
        path = self.root / "bounding_boxes.txt"
        if not valid.all():
            row = int((~valid).nonzero()[0])
            image_id = wanted[row]
            width, height = sizes.get(image_id, unknown)
            raise ValueError(
                f"{path}, line {_line_of(path, image_id)}: image {image_id} has the box (x, y, w, h) = "
                f"{tuple(boxes[image_id])}, which is not finite, has no width or height, or lies outside its "
                f"{width}x{height} image"
            )
        if was_clipped.any():
            first = wanted[int(was_clipped.nonzero()[0])]
            warnings.warn(
                f"clipped {int(was_clipped.sum())} box(es) of {path} that reach outside their images to them "
                f"(e.g. image {first})",
                CubcamWarning,
                stacklevel=3,
            )
        return clipped

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        return self._paths[index]

    def __getitem__(self, index: int) -> Sample:
        try:
            image = load_rgb(self._paths[index])
        except OSError as error:  # its message names the file
            raise BadImage(f"{error}; {SKIP_HINT}") from error
        box, parts = self._boxes[index], self._parts[index]
        if self.transform is not None:
            tensor, box, parts = self.transform(image, box, parts)
        else:
            tensor = to_tensor(image, self.mean, self.std)
        return Sample(
            image=tensor, label=self.labels[index], box=box, parts=parts, image_id=self.image_ids[index], index=index
        )

    def __repr__(self) -> str:
        return (
            f"CUBDataset({str(self.root)!r}, split={self.split!r}, split_scheme={self.split_scheme!r}, "
            f"val_fraction={self.val_fraction}, seed={self.seed}, "
            f"{len(self)} images, {len(self.class_names)} classes, transform={self.transform!r})"
        )


def _probe(path: Path, decode: bool) -> tuple[bool, tuple[int, int] | None]:
    """(usable, (width, height) as its header says, or None). Usable: the file exists and its header reads as an
    image, and with ``decode`` the whole file decodes (JPEGs at 1/8 scale through ``draft``: the full stream is
    still read)."""
    if not path.is_file():
        return False, None
    try:
        with Image.open(path) as image:
            size = image.size
            if decode:
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
        return True, size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # the last one is not an OSError
        return False, None


def _line_of(path: Path, image_id: int) -> int:
    """The line of a CUB file that starts with ``image_id`` (to name it in an error)."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.split(maxsplit=1)[:1] == [str(image_id)]:
            return number
    return 0


def spread_indices(total: int, num: int) -> list[int]:
    """``num`` indices spread evenly over ``range(total)``: CUB is sorted by class, so a panel shows many classes."""
    if total == 0:
        return []
    return sorted({int(i) for i in np.linspace(0, total - 1, min(num, total)).round()})
