"""A synthetic CUB-200-2011: the same files and formats, with drawn "birds" whose boxes and parts are exact.

    python -m cubcam.train.data.synthetic --out data/synthetic_cub --classes 8 --per-class 30 --size 128 --seed 0

Why it looks the way it does:
- every class is one bird design: body, wing and breast in shades of the class's own hue (evenly spaced over the
  colour wheel), a head of another hue, and its own body elongation, head size, beak and tail shape. It is drawn
  tilted, facing left or right, at a random scale and place inside what the evaluation crop keeps;
- the clutter is a noisy gradient between two random muted colours plus distractor shapes whose colours are drawn
  from the union of all classes' palettes, so nothing but the bird identifies the class: a model that learns the
  task must look at the bird. Saturated birds on a muted background keep the task learnable by a ResNet-18 from
  scratch on a CPU in the demo's few epochs (its accuracy: README);
- everything is a polygon drawn into the image and into a mask at once: ``bounding_boxes.txt`` is the mask's tight
  box and ``parts/part_locs.txt`` holds CUB's 15 parts at the drawn positions (the far-side eye and wing are
  invisible). The masks are written too, as CUB's separate segmentation release lays them out
  (``<out>/segmentations/<class>/<file>.png``), so tests can check the boxes against the pixels;
- image ``k`` with ``k % 50 == 1`` is stored as a grayscale JPEG, as a few of CUB's are;
- ``train_test_split.txt`` puts every other image of a class in the test split (CUB's split is about half/half).
Image sizes vary like CUB's: the shorter side is ``size``, the longer one up to a third more.
"""

from __future__ import annotations

import argparse
import colorsys
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cubcam.cams.files import write_text
from cubcam.train.data.presets import PART_NAMES

Color = tuple[int, int, int]
_HUE_NAMES = ("Red", "Orange", "Yellow", "Lime", "Green", "Jade", "Cyan", "Azure", "Blue", "Violet", "Purple", "Rose")
_KINDS = ("Finch", "Warbler", "Shrike", "Swallow", "Tern")  # by body elongation


@dataclass(frozen=True)
class BirdDesign:
    """What makes a class: colours and shape proportions (lengths in units of the body's half-height)."""

    name: str
    body: Color
    head: Color
    wing: Color
    breast: Color
    beak: Color
    aspect: float  # body half-length / half-height
    head_radius: float
    beak_length: float
    tail_length: float
    tail_spread: float


def _rgb(hue: float, saturation: float, value: float) -> Color:
    red, green, blue = colorsys.hsv_to_rgb(hue % 1.0, saturation, value)
    return round(255 * red), round(255 * green), round(255 * blue)


def bird_designs(classes: int, seed: int = 0) -> list[BirdDesign]:
    """One distinct design per class: evenly spaced body hues, the other attributes spread evenly and shuffled."""
    rng = np.random.default_rng([seed, classes])
    hues = np.arange(classes) / classes

    def spread(low: float, high: float) -> np.ndarray:
        return rng.permutation(np.linspace(low, high, classes))

    head_hue = rng.permutation(hues) + 0.5 / classes
    aspect, head, beak = spread(1.2, 2.3), spread(0.45, 0.8), spread(0.3, 1.1)
    tail, fan = spread(0.4, 1.6), spread(0, 0.7)
    beak_colors = [(250, 190, 20), (40, 35, 30), (230, 110, 40), (200, 200, 190)]
    designs, names = [], set()
    for c in range(classes):
        name = (
            f"{_HUE_NAMES[int(head_hue[c] * 12) % 12]}_headed_{_HUE_NAMES[int(hues[c] * 12) % 12]}_"
            f"{_KINDS[min(int((aspect[c] - 1.2) / 1.1 * len(_KINDS)), len(_KINDS) - 1)]}"
        )
        if name in names:
            name = f"{name}_{c + 1}"
        names.add(name)
        designs.append(
            BirdDesign(
                name=name,
                body=_rgb(hues[c], 0.95, 0.95),
                head=_rgb(head_hue[c], 0.75, 0.95),
                wing=_rgb(hues[c], 0.9, 0.5),
                breast=_rgb(hues[c], 0.4, 1.0),
                beak=beak_colors[c % len(beak_colors)],
                aspect=float(aspect[c]),
                head_radius=float(head[c]),
                beak_length=float(beak[c]),
                tail_length=float(tail[c]),
                tail_spread=float(fan[c]),
            )
        )
    return designs


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 28) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _bird_shapes(d: BirdDesign) -> tuple[list[tuple[np.ndarray, Color]], dict[str, np.ndarray]]:
    """The bird facing right (its right side towards the viewer), body centred at 0 with half-height 1: polygons
    in drawing order and the visible parts' locations."""
    a, r = d.aspect, d.head_radius
    hx, hy = 0.78 * a, -0.8  # head centre
    beak = np.array(
        [[hx + 0.8 * r, hy - 0.28 * r], [hx + r + d.beak_length, hy + 0.05 * r], [hx + 0.8 * r, hy + 0.3 * r]]
    )
    tail_end = -a - d.tail_length
    tail = np.array(
        [[-0.7 * a, -0.35], [tail_end, -0.45 - d.tail_spread], [tail_end, 0.05 + d.tail_spread], [-0.7 * a, 0.25]]
    )
    legs = [
        np.array([[x - 0.07, 0.8], [x + 0.07, 0.8], [x + 0.07 + 0.15, 1.6], [x - 0.07 + 0.15, 1.6]])
        for x in (0.15 * a, -0.2 * a)
    ]  # near (right) leg in front, far (left) leg behind
    wing = _ellipse(-0.12 * a, -0.12, 0.62 * a, 0.5)
    wing[:, 1] += 0.25 * (wing[:, 0] + 0.12 * a) / a  # tilt the wing down towards the tail
    eye = _ellipse(hx + 0.38 * r, hy - 0.18 * r, 0.17 * r, 0.17 * r, 12)
    shapes = [
        (legs[1], (70, 60, 50)),
        (tail, d.wing),
        (_ellipse(0, 0, a, 1.0), d.body),
        (_ellipse(0.45 * a, 0.3, 0.45 * a, 0.6), d.breast),
        (legs[0], (70, 60, 50)),
        (wing, d.wing),
        (_ellipse(hx, hy, r, r), d.head),
        (beak, d.beak),
        (eye, (15, 15, 20)),
    ]
    on_body = lambda x: np.sqrt(max(0.0, 1 - (x / a) ** 2))  # noqa: E731  (body outline half-height at x)
    parts = {
        "back": (-0.2 * a, -0.95 * on_body(-0.2 * a)),
        "beak": tuple(beak.mean(0)),
        "belly": (0.0, 0.8),
        "breast": (0.6 * a, 0.35),
        "crown": (hx, hy - 0.92 * r),
        "forehead": (hx + 0.7 * r, hy - 0.62 * r),
        "right eye": (hx + 0.38 * r, hy - 0.18 * r),
        "right leg": tuple(legs[0][2:].mean(0)),
        "left leg": tuple(legs[1][2:].mean(0)),
        "right wing": (-0.12 * a, -0.12),
        "nape": (hx - 0.85 * r, hy + 0.3 * r),
        "tail": (0.5 * (tail_end - 0.7 * a), -0.1),
        "throat": (hx + 0.5 * r, hy + 0.8 * r),
    }
    return shapes, {name: np.array(xy, dtype=float) for name, xy in parts.items()}


def draw_bird_image(
    design: BirdDesign, palette: list[Color], rng: np.random.Generator, size: int
) -> tuple[Image.Image, Image.Image, np.ndarray]:
    """One picture: cluttered background, the bird on top. Returns (RGB image, bird mask "L", parts [15, 3])."""
    long_side = round(size * rng.uniform(1.0, 4 / 3))
    width, height = (long_side, size) if rng.random() < 0.75 else (size, long_side)
    image = _background(palette, rng, width, height)

    shapes, parts = _bird_shapes(design)
    mirror = rng.random() < 0.5  # facing left: the left side (eye, wing) is the visible one
    angle = rng.uniform(-0.35, 0.35)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    flip = np.array([-1.0, 1.0]) if mirror else np.ones(2)
    points = np.concatenate([p for p, _ in shapes]) @ rotation.T * flip
    low, high = points.min(0), points.max(0)
    # Keep the bird inside what the evaluation preset's centre crop sees (the central square, less 256/224's
    # margin), filling 60-90% of it: a bird cut by that crop would have a clipped box.
    side = min(width, height) * 0.85
    scale = rng.uniform(0.6, 0.9) * side / (high - low).max()
    corner = np.array([width - side, height - side]) / 2
    offset = corner - low * scale + rng.uniform(0, 1, 2) * (side - (high - low) * scale)

    def place(xy: np.ndarray) -> np.ndarray:
        return (xy @ rotation.T * flip) * scale + offset

    mask = Image.new("L", (width, height), 0)
    draw, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for polygon, color in shapes:
        xy = [tuple(p) for p in place(polygon)]
        draw.polygon(xy, fill=color)
        draw_mask.polygon(xy, fill=255)

    locations = np.zeros((len(PART_NAMES), 3))
    for name, part in parts.items():
        if mirror:
            name = name.replace("right", "left") if "right" in name else name.replace("left", "right")
        locations[PART_NAMES.index(name)] = (*place(part[None])[0], 1.0)
    return image, mask, locations


def _background(palette: list[Color], rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A noisy gradient between two random muted colours, with 4-9 distractor shapes (ellipses, boxes, triangles,
    bars) in colours of the birds' palettes."""
    top, bottom = (
        np.array(_rgb(rng.random(), rng.uniform(0.05, 0.25), rng.uniform(0.35, 0.85)), dtype=float) for _ in range(2)
    )
    t = np.linspace(0, 1, height)[:, None, None]
    pixels = (1 - t) * top + t * bottom + rng.normal(0, 10, (height, width, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    for _ in range(rng.integers(4, 10)):
        color = palette[rng.integers(len(palette))]
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.03, 0.11, size=2) * side
        kind = rng.integers(4)
        if kind == 0:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=color)
        elif kind == 1:
            draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=color)
        elif kind == 2:
            draw.polygon([tuple(p) for p in rng.uniform(-1, 1, (3, 2)) * (rx, ry) * 1.5 + (cx, cy)], fill=color)
        else:
            end = (cx + rng.uniform(-3, 3) * rx, cy + rng.uniform(-3, 3) * ry)
            draw.line([(cx, cy), end], fill=color, width=max(1, round(0.03 * side)))
    return image


def make_synthetic_cub(out: Path | str, classes: int = 10, per_class: int = 20, size: int = 128, seed: int = 0) -> Path:
    """Write ``<out>/CUB_200_2011/`` (and ``<out>/segmentations/``) in CUB's exact format; returns the
    ``CUB_200_2011`` folder. Deterministic for a seed; overwrites a previous synthetic set in the same place."""
    if classes < 2 or per_class < 2 or size < 32:
        raise ValueError(f"need classes >= 2, per_class >= 2 and size >= 32, got {classes}, {per_class}, {size}")
    out = Path(out)
    root = out / "CUB_200_2011"
    designs = bird_designs(classes, seed)
    palette = [color for d in designs for color in (d.body, d.head, d.wing, d.breast)]
    folders = [f"{c + 1:03d}.{d.name}" for c, d in enumerate(designs)]

    images, labels, split, boxes, part_locs = [], [], [], [], []
    image_id = 0
    for c, design in enumerate(designs):
        for folder in (root / "images" / folders[c], out / "segmentations" / folders[c]):
            folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            image_id += 1
            rng = np.random.default_rng([seed, image_id])
            image, mask, locations = draw_bird_image(design, palette, rng, size)
            name = f"{design.name}_{k + 1:04d}_{image_id}"
            if image_id % 50 == 1:
                image = image.convert("L")
            image.save(root / "images" / folders[c] / f"{name}.jpg", quality=90)
            mask.save(out / "segmentations" / folders[c] / f"{name}.png")
            bbox = mask.getbbox()
            if bbox is None:
                raise RuntimeError(f"synthetic bird {name} drew no pixels")
            x0, y0, x1, y1 = bbox
            images.append(f"{image_id} {folders[c]}/{name}.jpg")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {int(k % 2 == 0)}")
            boxes.append(f"{image_id} {x0:.1f} {y0:.1f} {x1 - x0:.1f} {y1 - y0:.1f}")
            part_locs += [
                f"{image_id} {p + 1} {x:.1f} {y:.1f} {int(v)}" if v else f"{image_id} {p + 1} 0.0 0.0 0"
                for p, (x, y, v) in enumerate(locations)
            ]

    (root / "parts").mkdir(exist_ok=True)
    files = {
        "images.txt": images,
        "image_class_labels.txt": labels,
        "train_test_split.txt": split,
        "bounding_boxes.txt": boxes,
        "classes.txt": [f"{c + 1} {f}" for c, f in enumerate(folders)],
        "parts/parts.txt": [f"{p + 1} {name}" for p, name in enumerate(PART_NAMES)],
        "parts/part_locs.txt": part_locs,
        "README": [
            f"Synthetic CUB-200-2011 stand-in written by cubcam.train.data.synthetic: {classes} classes x "
            f"{per_class} images, shorter side {size} px, seed {seed}."
        ],
    }
    # images.txt last: a set whose writing stopped half-way is not taken for a whole one (demo.sh checks it).
    for relative, lines in sorted(files.items(), key=lambda item: item[0] == "images.txt"):
        write_text(root / relative, "\n".join(lines) + "\n")
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder that will hold CUB_200_2011/")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=128, help="shorter image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = make_synthetic_cub(args.out, args.classes, args.per_class, args.size, args.seed)
    print(f"wrote {args.classes * args.per_class} images in {args.classes} classes to {root}")


if __name__ == "__main__":
    main()
