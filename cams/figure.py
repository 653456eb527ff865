"""Figures of CAMs for people: boxes drawn on tiles and captioned grids of tiles, as uint8 arrays (Pillow only).

    from cubcam.cams.figure import grid, draw_boxes, cam_box, cam_tile, save_png
    save_png(grid(images, captions, cams=maps, boxes=gt_boxes), "panel.png")   # overlays, GT green, CAM red

Shared by the training callback's per-epoch PNG panels and ``cubcam explain``, so both look the same. Boxes are
``(x, y, w, h)`` in pixels, as CUB's ``bounding_boxes.txt`` and ``cubcam.cams.localization`` use them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from cubcam.cams.files import write_bytes
from cubcam.cams.localization import largest_box
from cubcam.cams.overlay import overlay
from cubcam.cams.protocol import PairMaps

GT_COLOR = (0, 200, 0)  # green: the ground-truth box
CAM_COLOR = (255, 0, 0)  # red: the box of the CAM's largest region
BOX_LEGEND = "Green box: the ground truth. Red box: the map's largest region above the CAM threshold."
BoxLike = Tensor | np.ndarray | Sequence[float]
GAP = 4  # white pixels between the cells of a strip


def marked(label: str, cam: Tensor) -> str:
    """A caption's ``label`` for a map, with "(empty map)" where the map is all zeros (nothing passed the ReLU):
    otherwise its tile is a flat blue that looks like a drawing fault."""
    return label if bool((cam > 0).any()) or bool(cam.isnan().any()) else f"{label} (empty map)"


def cam_box(cam_map: Tensor | np.ndarray, threshold: float = 0.5) -> np.ndarray | None:
    """The CAM's box: the largest (by box area) connected region of the map above ``threshold`` (on its 8-bit
    quantisation, as ``cubcam.cams.localization.boxes_from_map`` cuts it), xywh; None if empty.

    The same boxes MaxBoxAccV2 scores (``cubcam.cams.localization.boxes_from_map``); a figure shows the biggest one.
    A map that is not finite (a diverged model's) has none.
    """
    array = np.asarray(cam_map.detach().cpu() if isinstance(cam_map, Tensor) else cam_map)
    if not np.isfinite(array).all():
        return None
    box = largest_box(array, threshold)
    return None if box is None else box.astype(np.float64)


def draw_boxes(
    tile: np.ndarray, gt_box: BoxLike | None = None, cam_box: BoxLike | None = None, width: int = 2
) -> np.ndarray:
    """A copy of the uint8 [H, W, 3] tile with the GT box (green) and the CAM box (red) outlined; either may be None
    (or empty: w or h <= 0).

    The outline lies inside the box: a box (x, y, w, h) colours columns x .. x+w-1 and rows y .. y+h-1 at its edges.
    The CAM box is drawn last, so where the two coincide red shows.
    """
    array = _check_tile(tile)
    image = Image.fromarray(array.copy())
    draw = ImageDraw.Draw(image)
    for box, color in ((gt_box, GT_COLOR), (cam_box, CAM_COLOR)):
        if box is None:
            continue
        x, y, w, h = (
            float(v)
            for v in np.asarray(box.detach().cpu() if isinstance(box, Tensor) else box, dtype=np.float64).reshape(4)
        )
        if w <= 0 or h <= 0:  # e.g. a GT box the centre crop cut away
            continue
        x0, y0 = round(x), round(y)
        x1, y1 = max(x0, round(x + w) - 1), max(y0, round(y + h) - 1)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=width)
    return np.asarray(image)


def cam_tile(
    image: Tensor | np.ndarray,
    cam_map: Tensor | np.ndarray,
    gt_box: BoxLike | None = None,
    colormap: str = "jet",
    alpha: float = 0.5,
    threshold: float = 0.5,
) -> np.ndarray:
    """The heatmap over the image (``cubcam.cams.overlay``) with the GT box (if known) and the CAM's box drawn on it."""
    tile = overlay(image, cam_map, colormap=colormap, alpha=alpha)
    cam = torch.as_tensor(cam_map).detach().float().cpu()
    if cam.dim() == 2 and cam.shape != tile.shape[:2]:  # a layer-resolution map: box it at the tile's resolution
        cam = F.interpolate(cam[None, None], size=tile.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    return draw_boxes(tile, gt_box, cam_box(cam, threshold))


def grid(
    tiles: Sequence[np.ndarray | Tensor],
    captions: Sequence[str] | None = None,
    ncols: int = 4,
    cams: Sequence[Tensor | np.ndarray] | None = None,
    boxes: Sequence[BoxLike | None] | None = None,
    colormap: str = "jet",
    alpha: float = 0.5,
    threshold: float = 0.5,
    pad: int = 4,
    font_size: int | None = None,
) -> np.ndarray:
    """Tiles in rows of ``ncols`` on white, each with its caption (may hold newlines; wrapped to the tile) below.

    With ``cams`` the tiles are the plain images and each becomes :func:`cam_tile` (overlay, CAM box in red, and
    the GT box from ``boxes`` in green where one is given); without, the tiles are used as they are. Tiles may
    differ in size (each cell is as large as the largest). Returns uint8 [H, W, 3].
    """
    for name, items in (("cams", cams), ("boxes", boxes)):
        if items is not None and len(items) != len(tiles):
            raise ValueError(f"got {len(tiles)} tiles but {len(items)} {name}")
    if cams is not None:
        tiles = [
            cam_tile(t, m, None if boxes is None else boxes[i], colormap, alpha, threshold)
            for i, (t, m) in enumerate(zip(tiles, cams))
        ]
    elif boxes is not None:
        tiles = [draw_boxes(as_uint8(t), box) for t, box in zip(tiles, boxes)]
    return placed_grid(tiles, captions, ncols, pad, font_size)[0]


def placed_grid(
    tiles: Sequence[np.ndarray | Tensor],
    captions: Sequence[str] | None = None,
    ncols: int = 4,
    pad: int = 4,
    font_size: int | None = None,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """:func:`grid` of tiles used as they are, and where each tile sits in it, (left, top): to draw boxes over the
    grid elsewhere (W&B's box groups over the one grid image)."""
    if len(tiles) == 0:
        raise ValueError("grid needs at least one tile")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    if captions is not None and len(captions) != len(tiles):
        raise ValueError(f"got {len(tiles)} tiles but {len(captions)} captions")
    arrays = [_check_tile(as_uint8(t)) for t in tiles]
    font, wrapped, origins, (height, width) = _layout(arrays, captions, ncols, pad, font_size)
    cell_h = max(a.shape[0] for a in arrays)
    line_h = _line_height(font)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for array, lines, (left, top) in zip(arrays, wrapped, origins):
        canvas.paste(Image.fromarray(array), (left, top))
        for n, line in enumerate(lines):
            draw.text((left, top + cell_h + pad // 2 + n * line_h), line.replace(NBSP, " "), fill=(0, 0, 0), font=font)
    return np.asarray(canvas), origins


def with_legend(image: np.ndarray, legend: str, pad: int = 4) -> np.ndarray:
    """``image`` under a white banner that holds ``legend`` (lines, each wrapped to the image's width): what its
    colours and cells mean, inside the picture. Returns uint8 [H', W, 3]."""
    width = image.shape[1]
    font = _font(max(10, min(16, width // 60)))
    lines = _wrap(legend, font, width - 2 * pad, max_lines=3)
    line_h = _line_height(font)
    banner = Image.new("RGB", (width, pad + len(lines) * line_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(banner)
    for n, line in enumerate(lines):
        draw.text((pad, pad + n * line_h), line.replace(NBSP, " "), fill=(0, 0, 0), font=font)
    return np.concatenate([np.asarray(banner), image], axis=0)


def _layout(
    arrays: Sequence[np.ndarray], captions: Sequence[str] | None, ncols: int, pad: int, font_size: int | None
) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, list[list[str]], list[tuple[int, int]], tuple[int, int]]:
    """:func:`grid`'s layout: (font, each caption's lines, each tile's origin, the grid's (height, width))."""
    cell_h, cell_w = max(a.shape[0] for a in arrays), max(a.shape[1] for a in arrays)
    font = _font(font_size or max(10, min(16, cell_w // 12)))
    line_h = _line_height(font)
    wrapped = [_wrap(c, font, cell_w) for c in captions] if captions is not None else [[] for _ in arrays]
    caption_h = max(len(lines) for lines in wrapped) * line_h + (pad if any(wrapped) else 0)
    ncols = min(ncols, len(arrays))
    nrows = -(-len(arrays) // ncols)
    step_x, step_y = cell_w + pad, cell_h + caption_h + pad
    origins = [(pad + (k % ncols) * step_x, pad + (k // ncols) * step_y) for k in range(len(arrays))]
    return font, wrapped, origins, (pad + nrows * step_y, pad + ncols * step_x)


def png_bytes(array: np.ndarray, compress_level: int = 1) -> bytes:
    """A uint8 [H, W, 3] array encoded as PNG: every row with PNG's Sub filter (each byte less the one a pixel to
    its left), deflated at ``compress_level`` with zlib's run-length strategy (``Z_RLE``: matches of one pixel back
    only, as the Sub filter leaves them) in one call, which releases the GIL. Pillow's encoder took 2.4x as long for
    the panel's grid, for a larger file; ``Z_RLE`` takes 12% less time than zlib's default on a demo panel (43% on
    noise-like images) for a file 10% larger (bench: ``bench/callback_overhead.py``)."""
    tile = _check_tile(array)
    rows = tile.reshape(len(tile), -1)
    filtered = np.empty((len(rows), rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 1  # Sub
    filtered[:, 1:4] = rows[:, :3]
    np.subtract(rows[:, 3:], rows[:, :-3], out=filtered[:, 4:])  # wraps modulo 256, as PNG's filters do
    height, width = tile.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        _png_chunk(kind, data)
        for kind, data in (
            (b"IHDR", header),
            (b"IDAT", _deflate(filtered.tobytes(), compress_level)),
            (b"IEND", b""),
        )
    )


def _deflate(data: bytes, level: int) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_RLE)
    return compressor.compress(data) + compressor.flush()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def save_png(array: np.ndarray, path: str | Path, compress_level: int = 1) -> Path:
    """Write a uint8 [H, W, 3] array as a PNG (parent folders created); returns the path.

    Compression level 1 (Pillow's default is 6): much faster to write and only slightly larger for these figures,
    the better trade for a file written every epoch of a training run (figures: README, Benchmarks).
    """
    return write_bytes(path, png_bytes(array, compress_level))


def _check_tile(tile: np.ndarray) -> np.ndarray:
    array = np.asarray(tile)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"a tile must be a uint8 [H, W, 3] array, got {array.dtype} {array.shape}")
    return array


def as_uint8(tile: np.ndarray | Tensor) -> np.ndarray:
    """An image as uint8 [H, W, 3]: uint8 arrays pass, a float [3, H, W] tensor in [0, 1] is converted."""
    if isinstance(tile, Tensor):
        return overlay(tile, np.zeros(tile.shape[-2:]), alpha=0.0)  # overlay's checks and conversion, no heatmap
    return np.asarray(tile)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (shipped with matplotlib, a dependency: Latin with accents, Greek, Cyrillic, where Pillow's
    default font draws boxes for any non-ASCII letter), else Pillow's default."""
    spec = importlib.util.find_spec("matplotlib")  # its font file only: importing matplotlib is not needed
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        with contextlib.suppress(OSError):
            return ImageFont.truetype(str(path), size)
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _line_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    _left, _top, _right, bottom = font.getbbox("Ag|")
    return int(bottom) + 2


NBSP = "\u00a0"  # joins the words of a name in a caption: wrapped as one word where a line can hold it


def unbroken(name: str) -> str:
    """``name`` (a class name, "Black footed Albatross") with non-breaking spaces, so that a caption's wrap keeps it
    on one line where it fits, and breaks it only where no line can hold it."""
    return NBSP.join(str(name).split())


def _wrap(
    caption: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int, max_lines: int = 2
) -> list[str]:
    """Greedy word wrap to ``width`` pixels, at most ``max_lines`` lines per caption line (a long class name would
    otherwise make every caption of the grid as tall as its own); what does not fit is cut with '...'. Words joined
    by :func:`unbroken` stay together where one line holds them; a file name wider than a line breaks after an '_'."""
    lines: list[str] = []
    for paragraph in str(caption).split("\n"):
        wrapped: list[str] = []
        line = ""
        for unit in paragraph.split(" "):
            for k, (glue, piece) in enumerate(_pieces(unit, font, width)):
                candidate = f"{line}{' ' if k == 0 else glue}{piece}" if line else piece
                if line and font.getlength(candidate) > width:
                    wrapped.append(line)
                    candidate = piece
                line = candidate
        wrapped.append(line)
        cut = len(wrapped) > max_lines
        wrapped = wrapped[:max_lines]
        lines += [_fit(text, font, width, cut and n == len(wrapped) - 1) for n, text in enumerate(wrapped)]
    return lines


def _pieces(unit: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[tuple[str, str]]:
    """The (glue, text) pieces a line may break between: ``unit`` whole where it fits in ``width``; else its words
    (glued by a non-breaking space), and a word still too wide in parts, each ending at an '_' (glued by nothing)."""
    if font.getlength(unit) <= width:
        return [("", unit)]
    pieces = []
    for k, word in enumerate(unit.split(NBSP)):
        parts = re.split(r"(?<=_)", word) if font.getlength(word) > width else [word]
        pieces += [(NBSP if k and not j else "", part) for j, part in enumerate(parts) if part]
    return pieces


def _fit(line: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int, cut: bool) -> str:
    """``line`` as it fits in ``width`` pixels: as it is, or shortened and ended with '...' (always, if ``cut``)."""
    if not cut and font.getlength(line) <= width:
        return line
    while line and font.getlength(line + "...") > width:
        line = line[:-1]
    return line.rstrip() + "..."


@dataclass
class Cell:
    """One image of a strip: the picture, its GT box and class, and optionally a CAM (its class: ``cam_class``)."""

    image: np.ndarray  # uint8 [H, W, 3]
    gt_box: BoxLike | None  # (x, y, w, h) in pixels
    gt_class: int
    cam: Tensor | None = None  # [H, W] in [0, 1]
    cam_class: int | None = None


@dataclass
class Strip:
    """A bird's cells side by side: ``pixels`` without boxes (W&B draws them), ``boxed`` with them (the PNG)."""

    pixels: np.ndarray
    boxed: np.ndarray
    gt_boxes: list[tuple[np.ndarray, int]] = field(default_factory=list)  # (x, y, w, h in strip pixels, class)
    cam_boxes: list[tuple[np.ndarray, int]] = field(default_factory=list)
    cell_cam_boxes: list[np.ndarray | None] = field(default_factory=list)  # each cell's CAM box, in its pixels


def render_strip(cells: list[Cell], colormap: str, alpha: float, threshold: float) -> Strip:
    """Overlay each cell's CAM, box its largest region at ``threshold`` (see ``cubcam.cams.figure.cam_box``), join the
    cells left to right with a white gap; box coordinates are shifted into the strip."""
    plain, boxed, gt_boxes, cam_boxes, cell_boxes = [], [], [], [], []
    left = 0
    for cell in cells:
        pixels = overlay(cell.image, cell.cam, colormap, alpha) if cell.cam is not None else as_uint8(cell.image)
        box = cam_box(cell.cam, threshold) if cell.cam is not None else None
        cell_boxes.append(box)
        gt = None if cell.gt_box is None else np.asarray(cell.gt_box, dtype=np.float64).reshape(4)
        plain.append(pixels)
        boxed.append(draw_boxes(pixels, gt, box))
        shift = np.array([left, 0, 0, 0], dtype=np.float64)
        if gt is not None and gt[2] > 0 and gt[3] > 0:
            gt_boxes.append((gt + shift, cell.gt_class))
        if box is not None:
            cam_boxes.append((box + shift, cell.cam_class if cell.cam_class is not None else cell.gt_class))
        left += pixels.shape[1] + GAP
    return Strip(_join(plain), _join(boxed), gt_boxes, cam_boxes, cell_boxes)


def pair_strips(
    first: Sequence[np.ndarray],
    second: Sequence[np.ndarray],
    pairs: PairMaps,
    boxes: tuple[Sequence[BoxLike | None], Sequence[BoxLike | None]],
    classes: tuple[Sequence[int], Sequence[int]],
    colormap: str = "jet",
    alpha: float = 0.5,
    threshold: float = 0.5,
) -> list[Strip]:
    """The proxy-pair view as strips, one per pair: image b of ``first`` with its map against its partner, then
    the partner with its map against image b (``cubcam.cams.protocol.pair_maps``); each CAM box is labelled with
    the other image's class. The callback's nearest-image panel and ``cubcam explain --query`` both draw these."""
    maps = pairs.first.cpu(), pairs.second.cpu()
    return [
        render_strip(
            [
                Cell(first[b], boxes[0][b], classes[0][b], maps[0][b], classes[1][b]),
                Cell(second[b], boxes[1][b], classes[1][b], maps[1][b], classes[0][b]),
            ],
            colormap,
            alpha,
            threshold,
        )
        for b in range(len(first))
    ]


def _join(tiles: list[np.ndarray]) -> np.ndarray:
    height = max(t.shape[0] for t in tiles)
    parts = []
    for k, tile in enumerate(tiles):
        if k:
            parts.append(np.full((height, GAP, 3), 255, np.uint8))
        if tile.shape[0] < height:
            tile = np.concatenate([tile, np.full((height - tile.shape[0], tile.shape[1], 3), 255, np.uint8)])
        parts.append(tile)
    return np.concatenate(parts, axis=1)
