"""cubcam.cams.figure: boxes land on the right pixels, grids have the size the layout implies, captions are drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cubcam.cams.figure import CAM_COLOR, GT_COLOR, cam_box, cam_tile, draw_boxes, grid, save_png


def test_draw_boxes_colours_exactly_the_box_edges():
    tile = np.zeros((40, 50, 3), np.uint8)
    out = draw_boxes(tile, gt_box=(10, 5, 20, 30), cam_box=torch.tensor([2.0, 2.0, 6.0, 6.0]), width=1)
    assert tile.max() == 0  # the input is not modified
    for x, y in [(10, 5), (29, 5), (10, 34), (29, 34), (20, 5), (10, 20)]:  # corners and edge midpoints
        assert tuple(out[y, x]) == GT_COLOR, (x, y)
    assert tuple(out[2, 2]) == CAM_COLOR and tuple(out[7, 7]) == CAM_COLOR
    assert out[20, 20].max() == 0 and out[35, 10].max() == 0 and out[5, 30].max() == 0  # inside / just outside
    assert (out.reshape(-1, 3) == GT_COLOR).all(1).sum() == 2 * 20 + 2 * 28  # the GT outline and nothing else


def test_draw_boxes_rejects_bad_tiles_and_skips_empty_boxes():
    with pytest.raises(ValueError, match="uint8"):
        draw_boxes(np.zeros((8, 8, 3), np.float32), (1, 1, 2, 2))
    empty = draw_boxes(np.zeros((8, 8, 3), np.uint8), (1, 1, 0, 2))  # a box the crop cut away: nothing drawn
    assert empty.max() == 0


def test_cam_box_is_the_largest_region_and_cam_tile_draws_it():
    cam = np.zeros((32, 32))
    cam[4:8, 4:8] = 1.0  # small blob
    cam[12:28, 10:30] = 0.9  # large blob: the box a figure shows
    box = cam_box(cam, threshold=0.5)
    np.testing.assert_allclose(box, [10, 12, 20, 16], atol=1)
    assert cam_box(np.zeros((8, 8)), 0.5) is None
    # a layer-resolution map (16x16) is boxed at the tile's resolution
    small = torch.zeros(16, 16)
    small[8:16, 8:16] = 1.0
    tile = cam_tile(np.full((64, 64, 3), 128, np.uint8), small, gt_box=(0, 0, 64, 64), alpha=0.0)
    red = np.argwhere((tile == CAM_COLOR).all(-1))
    assert red[:, 0].min() >= 28 and red[:, 1].min() >= 28 and red.max() <= 63  # the box of the lower-right quarter
    assert tuple(tile[0, 0]) == GT_COLOR and tuple(tile[40, 40]) == (128, 128, 128)


def test_grid_layout_and_captions(tmp_path):
    tiles = [np.full((30, 40, 3), 60 * k, np.uint8) for k in range(5)]
    pad = 4
    plain = grid(tiles, ncols=3, pad=pad)
    assert plain.dtype == np.uint8 and plain.shape == (pad + 2 * (30 + pad), pad + 3 * (40 + pad), 3)
    assert (plain[pad : pad + 30, pad + 44 : pad + 84] == 60).all()  # second tile, first row
    assert (plain[pad + 34 : pad + 64, pad + 44 : pad + 84] == 240).all()  # fifth tile, second row
    assert (plain[pad + 34 :, pad + 88 :] == 255).all()  # the empty sixth cell stays white

    captioned = grid(tiles, [f"bird {k}\nline two" for k in range(5)], ncols=3, pad=pad)
    caption_h = (captioned.shape[0] - pad) // 2 - 30 - pad
    assert caption_h > 2 * 8  # two lines of text
    region = captioned[pad + 30 : pad + 30 + caption_h, pad : pad + 40]
    assert (region < 128).any() and (region == 255).any()  # dark text on white
    assert (captioned[pad : pad + 30, pad : pad + 40] == 0).all()  # the text stays off the tile

    path = save_png(captioned, tmp_path / "sub" / "grid.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), captioned)


def test_grid_with_cams_overlays_and_boxes_each_tile():
    images = [np.full((32, 32, 3), 100, np.uint8) for _ in range(2)]
    maps = [torch.zeros(32, 32), torch.zeros(32, 32)]
    maps[0][8:24, 8:24] = 1.0
    out = grid(images, ["a", "b"], ncols=2, cams=maps, boxes=[(0, 0, 32, 32), None], pad=0)
    first, second = out[:32, :32], out[:32, 32:64]
    assert tuple(first[0, 0]) == GT_COLOR and (first == CAM_COLOR).all(-1).any()
    assert not (second == GT_COLOR).all(-1).any() and not (second == CAM_COLOR).all(-1).any()  # flat map: no box
    assert not (first[16, 16] == 100).all()  # the heatmap is blended in
    with pytest.raises(ValueError, match="2 tiles but 1 cams"):
        grid(images, cams=maps[:1])


def test_long_class_names_stay_in_two_lines_of_their_tile() -> None:
    """A long name made every caption of its grid as tall as its own wrapped name; now it is cut at two lines."""
    from cubcam.cams.figure import _font, _wrap

    font = _font(12)
    name = "true: " + " ".join(["Extraordinarily"] * 12) + " Albatross"
    lines = _wrap(name + "\npred: Supercalifragilisticexpialidociousbird (p 0.50)", font, 64)
    assert len(lines) == 4 and lines[1].endswith("...") and lines[3].endswith("...")
    assert all(font.getlength(line) <= 64 for line in lines)
    tile = np.full((64, 64, 3), 128, dtype=np.uint8)
    short = grid([tile, tile], ["true: a\npred: b", "true: c\npred: d"], ncols=2)
    long = grid([tile, tile], [name + "\npred: b", "true: c\npred: d"], ncols=2)
    assert long.shape[0] - short.shape[0] <= 2 * 16  # two lines more at most, never the whole name


def test_class_names_wrap_whole_and_file_names_after_an_underscore() -> None:
    """explain's captions broke inside class names ("true: Azure headed Red / Warbler"); a name that a line holds now
    starts its own line, one no line holds breaks at its words, a file name after an '_'."""
    from cubcam.cams.figure import NBSP, _font, _wrap, unbroken

    font = _font(12)
    name = "Black footed Albatross"
    width = int(font.getlength(name)) + 2  # the name fits a line; "true: " and the name do not
    lines = [line.replace(NBSP, " ") for line in _wrap(f"true: {unbroken(name)}", font, width)]
    assert lines == ["true:", name]
    narrow = [line.replace(NBSP, " ") for line in _wrap(f"true: {unbroken(name)}", font, width // 2, max_lines=4)]
    assert " ".join(narrow) == f"true: {name}" and all(font.getlength(line) <= width // 2 for line in narrow)
    file = "Black_footed_Albatross_0001_796111.jpg"
    parts = _wrap(file, font, int(font.getlength("Black_footed_Albatross_")) + 2, max_lines=3)
    assert "".join(parts) == file and parts[0] == "Black_footed_Albatross_"


def test_explain_and_retrieval_captions_name_the_files() -> None:
    from cubcam.cams.figure import unbroken
    from cubcam.train.inspection.explain import caption, retrieval_caption

    record = {
        "source": "test[3]",
        "path": "/data/CUB_200_2011/images/001.Albatross/Albatross_0003_17.jpg",
        "true": {"class": 1, "name": "Albatross"},
        "predicted": {"class": 1, "name": "Albatross", "score": 0.9},
        "target": {"kind": "true", "class": 1, "name": "Albatross"},
    }
    assert caption(record, "p", torch.eye(4)).splitlines()[:2] == ["Albatross_0003_17.jpg", "true: Albatross"]
    assert retrieval_caption("q/bird.jpg", 2, 0.91234, "Laysan Albatross", "/x/Laysan_0002_9.jpg").split("\n") == [
        "query: bird.jpg",
        f"#2 (cos 0.912): {unbroken('Laysan Albatross')}",
        "Laysan_0002_9.jpg",
    ]


def test_non_ascii_class_names_draw_as_letters_not_boxes() -> None:
    from cubcam.cams.figure import _font

    font = _font(16)

    def drawn(text: str) -> np.ndarray:
        return np.asarray(font.getmask(text), dtype=np.uint8)

    missing = drawn("\U000f0000")  # a private-use code point: no font has it, so it shows the missing-glyph box
    for letter in ("ö", "ñ", "Ω", "Ж", "ł"):
        shape = drawn(letter)
        assert shape.shape != missing.shape or (shape != missing).any(), letter


def test_an_empty_map_says_so_in_its_caption_and_explain_names_the_class_it_explains() -> None:
    from cubcam.cams.figure import marked
    from cubcam.train.inspection.explain import caption

    assert marked("true", torch.zeros(4, 4)) == "true (empty map)"  # was: a flat blue tile, nothing said
    assert marked("true", torch.eye(4)) == "true"
    record = {
        "source": "bird.jpg",
        "true": None,
        "predicted": {"class": 1, "name": "Albatross", "score": 0.9},
        "target": {"kind": "predicted", "class": 1, "name": "Albatross"},
    }
    assert caption(record, "p", torch.eye(4)).splitlines() == [
        "bird.jpg",
        "pred (p 0.90): Albatross",  # the score before the name: a small tile cuts the name, never the score
        "map: Albatross (predicted)",
    ]
    assert caption(record, "p", torch.zeros(4, 4)).endswith("map: Albatross (predicted) (empty map)")


def test_coinciding_curves_are_told_apart_in_evaluates_plots() -> None:
    from matplotlib.figure import Figure

    from cubcam.train.inspection.plots import plot_curves

    axis = Figure().subplots()
    same = [0.1, 0.5, 0.3]
    labels = {"gradcam": "GradCAM", "hirescam": "HiResCAM", "layercam": "LayerCAM"}
    plot_curves(axis, [0, 1, 2], {"gradcam": same, "hirescam": list(same), "layercam": [0.2, 0.4, 0.1]}, labels)
    assert axis.get_legend_handles_labels()[1] == ["GradCAM", "HiResCAM (= GradCAM)", "LayerCAM"]
    solid, dashed, _ = axis.get_lines()
    assert solid.get_linestyle() == "-" and dashed.get_linestyle() != "-"  # the second stays visible on the first


def test_png_bytes_decode_to_the_same_pixels_with_valid_checksums():
    """cubcam's PNG encoder (Sub filter, one zlib call) against Pillow's reader, which checks every chunk's CRC."""
    import io

    from cubcam.cams.figure import png_bytes

    rng = np.random.default_rng(0)
    for shape in [(1, 1, 3), (5, 7, 3), (64, 200, 3), (301, 17, 3)]:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        encoded = png_bytes(pixels)
        Image.open(io.BytesIO(encoded)).verify()  # raises on a bad CRC or chunk
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(encoded))), pixels), shape
    with pytest.raises(ValueError):
        png_bytes(np.zeros((4, 4), np.float32))
