"""Seeded, deterministic image–caption pairs drawn with OpenCV (no downloads, no TensorFlow).

Each image shows one coloured shape at a random position and size on a noisy background. Each
caption names a colour and a shape; the label says whether the caption matches the image. Image
attributes and caption attributes are each uniform whatever the label, so neither modality alone
says anything about the label: only their combination does.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "star")
# BGR, as OpenCV draws and decodes.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (30, 30, 220),
    "green": (40, 190, 40),
    "blue": (220, 60, 30),
    "yellow": (30, 220, 230),
}
TEMPLATES = (
    "a photo of a {colour} {shape}",
    "a {colour} {shape}",
    "there is a {colour} {shape} in the picture",
    "an image showing a {colour} {shape} on a noisy background",
    "the {shape} is {colour}",
    "{colour} {shape}!",
    "Look: a {colour} {shape}, drawn small.",
)
LABELS = ("mismatch", "match")


@dataclass(frozen=True)
class Dataset:
    """Images (BGR uint8 ``[N, H, W, 3]``), captions, labels (1 = caption matches image)."""

    images: np.ndarray
    captions: list[str]
    labels: np.ndarray
    shapes: list[str]
    colours: list[str]
    said_shapes: list[str]
    said_colours: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def _star(cx: int, cy: int, r: int) -> np.ndarray:
    angles = np.arange(10) * np.pi / 5 - np.pi / 2
    radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).astype(np.int32)


def draw(shape: str, colour: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Draw one shape of one colour on a noisy grey background; returns BGR uint8."""
    base = rng.integers(70, 190)
    image = rng.normal(base, 18, (size, size, 3)) + rng.normal(0, 8, (1, 1, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    r = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(v) for v in rng.integers(r + 1, size - r - 1, 2))
    jitter = rng.integers(-25, 26, 3)
    bgr = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter, strict=True))
    if shape == "circle":
        cv2.circle(image, (cx, cy), r, bgr, -1, cv2.LINE_AA)
    elif shape == "square":
        cv2.rectangle(image, (cx - r, cy - r), (cx + r, cy + r), bgr, -1)
    elif shape == "triangle":
        pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
        cv2.fillPoly(image, [pts], bgr, cv2.LINE_AA)
    elif shape == "star":
        cv2.fillPoly(image, [_star(cx, cy, int(r * 1.2))], bgr, cv2.LINE_AA)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    return image


def generate(n: int, seed: int, size: int = 64) -> Dataset:
    """Generate ``n`` balanced image–caption pairs, deterministically from ``seed``.

    Mismatched captions differ from the image in colour only, in shape only, or in both, each a
    third of the time; caption attributes stay uniform whatever the label.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    rng = np.random.default_rng(seed)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    labels = rng.permutation(np.arange(n) % 2)
    images = np.empty((n, size, size, 3), np.uint8)
    captions: list[str] = []
    shapes: list[str] = []
    colours: list[str] = []
    said_shapes: list[str] = []
    said_colours: list[str] = []
    for i in range(n):
        colour, shape = combos[rng.integers(len(combos))]
        images[i] = draw(shape, colour, rng, size)
        if labels[i]:
            said_colour, said_shape = colour, shape
        else:
            # Each kind of mismatch equally often, so shape-only and colour-only mismatches
            # (the hard ones) are a third of the negatives each, not 3/15.
            kind = rng.integers(3)
            other_colours = [c for c in COLOURS if c != colour]
            other_shapes = [s for s in SHAPES if s != shape]
            said_colour = other_colours[rng.integers(3)] if kind != 1 else colour
            said_shape = other_shapes[rng.integers(3)] if kind != 0 else shape
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        captions.append(template.format(colour=said_colour, shape=said_shape))
        shapes.append(shape)
        colours.append(colour)
        said_shapes.append(said_shape)
        said_colours.append(said_colour)
    return Dataset(images, captions, labels.astype(np.int64), shapes, colours, said_shapes, said_colours)


def splits(samples: int, seed: int, size: int = 64) -> tuple[Dataset, Dataset, Dataset]:
    """Train / validation / test sets from distinct seeds (validation and test: 20% each)."""
    held_out = max(64, samples // 5)
    return (
        generate(samples, seed * 3 + 0, size),
        generate(held_out, seed * 3 + 1, size),
        generate(held_out, seed * 3 + 2, size),
    )


def encoded_pairs(n: int, seed: int, size: int = 64) -> list[tuple[bytes, str]]:
    """``n`` generated (PNG bytes, caption) pairs: what a caller sends a server."""
    from fusionserve.preprocess import encode_png

    ds = generate(n, seed, size)
    return [(encode_png(image), caption) for image, caption in zip(ds.images, ds.captions, strict=True)]
