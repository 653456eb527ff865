"""cubcam.train.data's dataset on the synthetic CUB: splits and labels against CUB's own files, boxes and parts
against the drawn birds, presets, bad files named or skipped, users' photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from crafted import png_header
from cub_files import copy_of, mask_of, table
from PIL import Image

from cubcam.cams.overlay import denormalize
from cubcam.train.data.cub import BadImage, CUBDataset, human_name
from cubcam.train.data.datamodule import CUBDataModule
from cubcam.train.data.presets import (
    MEAN,
    PART_NAMES,
    STD,
    EvalPreset,
    TrainPreset,
    cut_and_resize,
    load_rgb,
    to_tensor,
)
from cubcam.train.data.synthetic import bird_designs, make_synthetic_cub
from cubcam.train.data.synthetic import main as synthetic_main

# These tests validate on the test split on purpose (val_fraction=0: every image of a tiny CUB counts).
pytestmark = pytest.mark.filterwarnings("ignore:val_fraction is 0:cubcam.CubcamWarning")

SIZE = 48


@pytest.mark.parametrize("scheme", ["official", "zero_shot"])
def test_splits_and_labels_follow_cubs_files(synthetic_cub: Path, scheme: str) -> None:
    classes = table(synthetic_cub, "classes.txt")
    class_of = {i: int(c[0]) for i, c in table(synthetic_cub, "image_class_labels.txt").items()}
    is_train = {i: s == ["1"] for i, s in table(synthetic_cub, "train_test_split.txt").items()}
    half = len(classes) // 2
    for split in ("train", "test"):
        dataset = CUBDataset(synthetic_cub, split, scheme)
        if scheme == "official":
            expected_ids = [i for i in sorted(class_of) if is_train[i] == (split == "train")]
            class_ids = sorted(classes)
        else:  # first half of the classes for training, second half for testing, labels re-based to 0
            class_ids = sorted(classes)[:half] if split == "train" else sorted(classes)[half:]
            expected_ids = [i for i in sorted(class_of) if class_of[i] in class_ids]
        assert dataset.image_ids == expected_ids
        assert dataset.labels == [class_ids.index(class_of[i]) for i in expected_ids]
        assert dataset.class_names == [human_name(classes[c][0]) for c in class_ids]
        for index in (0, len(dataset) - 1):  # each file sits in the folder of the class its label names
            sample = dataset[index]
            folder = dataset.image_path(index).parent.name
            assert dataset.class_names[sample["label"]] == human_name(folder)
            assert sample["index"] == index and sample["image_id"] == expected_ids[index]
    assert len(CUBDataset(synthetic_cub, "train", scheme)) == 16  # 4 classes x 8: half of each class / half the classes


def test_class_names_and_root_forms(synthetic_cub: Path) -> None:
    assert human_name("001.Black_footed_Albatross") == "Black footed Albatross"
    names = [human_name(d.name) for d in bird_designs(4, seed=0)]
    assert CUBDataset(synthetic_cub / "CUB_200_2011", "test").class_names == names  # the folder itself works too
    data = CUBDataModule(root=str(synthetic_cub), split_scheme="zero_shot", val_fraction=0.0)
    assert (data.num_classes, data.class_names) == (2, names[:2])  # the trained classes, before setup
    assert CUBDataModule(root=str(synthetic_cub)).class_names == names


@pytest.mark.parametrize("preset", [EvalPreset(SIZE), TrainPreset(SIZE, flip_prob=0.5)], ids=["eval", "train"])
def test_transformed_box_and_parts_stay_on_the_bird(synthetic_cub: Path, preset) -> None:
    """The same geometry applied to the bird's mask: the box is its tight box, visible parts lie on it."""
    dataset = CUBDataset(synthetic_cub, "test")
    flips = whole = 0
    for index in range(len(dataset)):
        torch.manual_seed(index)
        image, box, parts = preset(load_rgb(dataset.image_path(index)), dataset[index]["box"], dataset[index]["parts"])
        torch.manual_seed(index)  # the train preset draws the same crop and flip for the mask
        mask, _, _ = preset(mask_of(dataset, index), dataset[index]["box"], dataset[index]["parts"])
        bird = denormalize(mask)[..., 0] > 10  # any coverage: a thin beak tip fades when downscaled
        assert image.shape == (3, SIZE, SIZE) and bird.any()
        ys, xs = np.nonzero(bird)
        x0, y0, w, h = box.tolist()
        bird_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        slack = 1.5  # interpolation blurs the mask's edge by a pixel
        assert x0 - slack <= bird_box[0] and y0 - slack <= bird_box[1]  # the box covers every bird pixel
        assert bird_box[2] <= x0 + w + slack and bird_box[3] <= y0 + h + slack
        if x0 > 0 and y0 > 0 and x0 + w < SIZE and y0 + h < SIZE:  # a bird cut by the crop may not touch its box
            np.testing.assert_allclose([x0, y0, x0 + w, y0 + h], bird_box, atol=slack)  # ... else it is tight
            whole += 1
        visible = parts[:, 2] == 1
        assert (parts[~visible] == 0).all()
        assert not (visible[PART_NAMES.index("left eye")] and visible[PART_NAMES.index("right eye")])  # side view
        for x, y, _ in parts[visible].tolist():
            near = bird[max(0, int(y) - 2) : int(y) + 3, max(0, int(x) - 2) : int(x) + 3]
            assert near.any(), (index, x, y)
        flips += bool(visible[PART_NAMES.index("left eye")])
    assert 0 < flips < len(dataset)  # birds face both ways
    assert whole >= len(dataset) // 4, whole


def test_flip_swaps_left_and_right_parts() -> None:
    image = Image.new("RGB", (100, 50))
    parts = torch.zeros(15, 3)
    parts[PART_NAMES.index("left eye")] = torch.tensor([10.0, 20.0, 1.0])
    box = torch.tensor([10.0, 5.0, 30.0, 40.0])
    _, new_box, new_parts = cut_and_resize(image, box, parts, (0, 0, 50, 50), size=25, flip=True)
    assert new_box.tolist() == [25 - 20, 2.5, 15, 20]  # x: 10..40 of 50 -> 5..20 of 25, mirrored -> 5..20
    assert new_parts[PART_NAMES.index("right eye")].tolist() == [25 - 5, 10, 1]
    assert new_parts[PART_NAMES.index("left eye")].tolist() == [0, 0, 0]


def test_eval_preset_clips_the_box_and_hides_parts_outside_the_crop() -> None:
    image = Image.new("RGB", (400, 200))  # crop: the centre 175 x 175 square, x 112.5..287.5
    parts = torch.zeros(15, 3)
    parts[0] = torch.tensor([10.0, 100.0, 1.0])  # left of the crop
    parts[1] = torch.tensor([200.0, 100.0, 1.0])  # centre
    _, box, new_parts = EvalPreset(70, resize_ratio=200 / 175)(image, torch.tensor([0.0, 50.0, 200.0, 100.0]), parts)
    torch.testing.assert_close(box, torch.tensor([0.0, (50 - 12.5) * 0.4, (200 - 112.5) * 0.4, 40.0]))
    assert new_parts[0].tolist() == [0, 0, 0] and new_parts[1].tolist() == [35, 35, 1]


def test_grayscale_jpeg_becomes_three_equal_channels(synthetic_cub: Path) -> None:
    dataset = CUBDataset(synthetic_cub, "train", transform=EvalPreset(SIZE))
    index = dataset.image_ids.index(1)  # the generator stores image k with k % 50 == 1 in grayscale
    assert Image.open(dataset.image_path(index)).mode == "L"
    image = dataset[index]["image"]
    assert image.shape == (3, SIZE, SIZE) and dataset.mean == MEAN and dataset.std == STD
    pixels = denormalize(image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert pixels.std() > 10  # a picture, not a flat field


def test_missing_root_names_the_layout_and_how_to_get_it(tmp_path: Path) -> None:
    for make in (lambda: CUBDataset(tmp_path / "nowhere"), lambda: CUBDataModule(root=str(tmp_path)).num_classes):
        with pytest.raises(FileNotFoundError) as err:
            make()
        message = str(err.value)
        assert "CUB_200_2011" in message and "images.txt" in message and "bounding_boxes.txt" in message
        assert "download: true" in message and "python -m cubcam.train.data.synthetic" in message


def test_missing_and_corrupt_images_fail_by_name_or_are_skipped_with_a_count(
    synthetic_cub: Path, tmp_path: Path
) -> None:
    root = copy_of(synthetic_cub, tmp_path)
    dataset = CUBDataset(root, "train")
    missing, truncated, garbage, bomb = (dataset.image_path(i) for i in (1, 4, 9, 12))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    dataset = CUBDataset(root, "train")  # a truncated file's header reads: it fails when it is decoded
    with pytest.raises(BadImage, match=rf"{truncated.name}.*; --data.skip_bad_images true"):
        dataset[4]

    # A missing file, one that is no image and a bomb fail when the dataset is built, counted.
    missing.unlink()
    garbage.write_bytes(b"not a jpeg at all")
    bomb.write_bytes(png_header(20000, 20000))  # over twice Pillow's MAX_IMAGE_PIXELS: DecompressionBombError
    with pytest.raises(BadImage, match=r"3 image file\(s\) of the train split are missing, empty or not images"):
        CUBDataset(root, "train")
    missing.touch()  # an empty file is no image either
    with pytest.raises(BadImage, match=r"3 image file\(s\) .* --data.skip_bad_images true"):
        CUBDataset(root, "train")

    with pytest.warns(UserWarning, match=r"skipped 4 unreadable image\(s\) of 16"):
        kept = CUBDataset(root, "train", skip_bad_images=True)
    bad = {missing, truncated, garbage, bomb}
    assert len(kept) == 12 and not bad & {kept.image_path(i) for i in range(len(kept))}
    for index in range(len(kept)):  # the labels still belong to their images
        assert kept.class_names[kept.labels[index]] == human_name(kept.image_path(index).parent.name)
    assert len(CUBDataset(root, "test", skip_bad_images=True)) == 16  # the other split is untouched


def test_inconsistent_metadata_is_an_error_not_a_mislabel(synthetic_cub: Path, tmp_path: Path) -> None:
    root = copy_of(synthetic_cub, tmp_path)
    labels = root / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text(labels.read_text().replace("1 1\n", "1 2\n", 1))  # image 1 claimed by class 2
    with pytest.raises(ValueError, match="image 1 .* stored in another class's folder"):
        CUBDataset(root)
    labels.write_text("\n".join(labels.read_text().splitlines()[1:]))  # image 1 has no label at all
    with pytest.raises(ValueError, match="image_class_labels.txt and .*images.txt list different image ids"):
        CUBDataset(root)
    labels.write_text("1 x\n")
    with pytest.raises(ValueError, match="image_class_labels.txt, line 1"):
        CUBDataset(root)


def test_synthetic_set_is_deterministic_and_written_in_cub_format(tmp_path: Path) -> None:
    def files(out: Path) -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    first = make_synthetic_cub(tmp_path / "a", classes=3, per_class=4, size=40, seed=5)
    synthetic_main(["--out", str(tmp_path / "b"), "--classes", "3", "--per-class", "4", "--size", "40", "--seed", "5"])
    make_synthetic_cub(tmp_path / "c", classes=3, per_class=4, size=40, seed=6)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a") != files(tmp_path / "c")
    names = {str(p.relative_to(first)) for p in first.rglob("*.txt")}
    assert names == {
        "images.txt",
        "image_class_labels.txt",
        "train_test_split.txt",
        "classes.txt",
        "bounding_boxes.txt",
        "parts/parts.txt",
        "parts/part_locs.txt",
    }
    assert len((first / "parts" / "part_locs.txt").read_text().splitlines()) == 12 * 15
    sizes = {Image.open(p).size for p in first.rglob("*.jpg")}
    assert min(min(s) for s in sizes) == 40 and len(sizes) > 1  # shorter side = size, aspect ratios vary


def test_each_bird_wears_its_class_colour(synthetic_cub: Path) -> None:
    """Inside the drawn mask, the JPEG's pixels near any class's body colour are near their own class's."""
    dataset = CUBDataset(synthetic_cub, "test")
    body = np.array([d.body for d in bird_designs(4, seed=0)], dtype=float)
    counts = np.zeros((4, 4))  # [true class, colour class] bird pixels close to that class's body colour
    bird_pixels = np.zeros(4)
    for index in range(len(dataset)):
        rgb = np.asarray(load_rgb(dataset.image_path(index)), dtype=float)
        bird = np.asarray(mask_of(dataset, index))[..., 0] > 127
        close = np.linalg.norm(rgb[bird][:, None] - body[None], axis=-1) < 60  # [pixels, colour class]
        counts[dataset.labels[index]] += close.sum(0)
        bird_pixels[dataset.labels[index]] += bird.sum()
    assert (np.diag(counts) > 0.9 * counts.sum(1)).all(), counts
    assert (np.diag(counts) > 0.1 * bird_pixels).all(), (counts, bird_pixels)  # the body: a real share of it


def test_load_rgb_handles_modes_and_names_bad_files(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent -> white
    rgba.save(tmp_path / "alpha.png")
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "sixteen.png")
    Image.new("P", (4, 4), 3).save(tmp_path / "palette.gif")
    loaded = load_rgb(tmp_path / "alpha.png")
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 1)) == (255, 0, 0)
    assert load_rgb(tmp_path / "sixteen.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(tmp_path / "palette.gif").mode == "RGB"
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(OSError, match="bad.jpg"):
        load_rgb(tmp_path / "bad.jpg")
    with pytest.raises(FileNotFoundError, match="absent.jpg"):
        load_rgb(tmp_path / "absent.jpg")


def test_denormalize_inverts_to_tensor() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    batch = torch.stack([to_tensor(Image.fromarray(p)) for p in pixels])
    assert (denormalize(batch) == pixels).all() and (denormalize(batch[1]) == pixels[1]).all()
    with pytest.raises(ValueError, match="shape"):
        denormalize(torch.zeros(5, 7))


def test_boxes_are_checked_where_they_are_read(synthetic_cub: Path, tmp_path: Path) -> None:
    """A NaN or negative width ended a run after a full epoch inside the callback, naming no image; a box reaching
    outside its image was scored as a miss. Now: an error naming the file, line and image id; a clip with one
    warning that counts them."""
    root = copy_of(synthetic_cub, tmp_path)
    boxes_file = root / "CUB_200_2011" / "bounding_boxes.txt"
    original = boxes_file.read_text().splitlines()
    for bad in ("nan", "-4.0", "0.0"):
        lines = list(original)
        image_id, x, y, _, h = lines[2].split()
        lines[2] = " ".join([image_id, x, y, bad, h])
        boxes_file.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=rf"bounding_boxes.txt, line 3: image {image_id} has the box"):
            CUBDataset(root, "train" if int(image_id) % 2 else "test")
    lines = list(original)
    image_id, x, y, _, h = lines[0].split()  # image 1 (train split): its box made to overhang the right edge
    lines[0] = " ".join([image_id, x, y, "500.0", h])
    boxes_file.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"clipped 1 box\(es\) of .*bounding_boxes.txt .* \(e.g. image 1\)"):
        dataset = CUBDataset(root, "train")
    width = Image.open(dataset.image_path(0)).width
    assert dataset.image_ids[0] == 1
    assert dataset._boxes[0].tolist() == pytest.approx([float(x), float(y), width - float(x), float(h)])


def test_users_photos_are_turned_upright_by_exif_and_the_dataset_keeps_its_pixels(tmp_path: Path) -> None:
    stored = Image.new("RGB", (96, 64), (255, 0, 0))
    stored.paste((0, 0, 255), (48, 0, 96, 64))  # left red, right blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": how a phone stores a portrait shot
    path = tmp_path / "photo.jpg"
    stored.save(path, exif=exif, quality=95)
    assert load_rgb(path).size == (96, 64)  # datasets: the stored pixels (CUB's boxes refer to them)
    upright = load_rgb(path, exif_orientation=True)
    assert upright.size == (64, 96)
    top, bottom = np.asarray(upright)[5, 32], np.asarray(upright)[90, 32]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # red above blue, as a viewer shows it


def test_uint8_images_are_drawn_as_their_pixels_and_other_integers_refused() -> None:
    pixels = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    assert (denormalize(pixels) == pixels.permute(1, 2, 0).numpy()).all()  # was: all white
    with pytest.raises(TypeError, match="images must be float .* or uint8"):
        denormalize(pixels.to(torch.int32))
