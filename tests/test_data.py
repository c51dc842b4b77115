"""The generated data set: deterministic, balanced, and only the image–caption pair predicts the label."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from fusionserve import data as gen
from fusionserve.export import DEFAULT_SAMPLES
from fusionserve.export.convert import PARITY_SAMPLES, PARITY_SEED
from fusionserve.preprocess import text_to_word_sequence


@pytest.fixture(scope="module")
def big() -> gen.Dataset:
    return gen.generate(2000, seed=5)


def _fields(ds: gen.Dataset) -> tuple:
    return ds.captions, ds.shapes, ds.colours, ds.said_shapes, ds.said_colours


def test_same_seed_same_data() -> None:
    a, b = gen.generate(60, seed=7), gen.generate(60, seed=7)
    assert np.array_equal(a.images, b.images)
    assert np.array_equal(a.labels, b.labels)
    assert _fields(a) == _fields(b)


def test_different_seed_different_data() -> None:
    a, b = gen.generate(60, seed=7), gen.generate(60, seed=8)
    assert not np.array_equal(a.images, b.images)
    assert not any(np.array_equal(x, y) for x, y in zip(a.images, b.images, strict=True))
    assert a.captions != b.captions
    assert not np.array_equal(a.labels, b.labels)


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_and_types(size: int) -> None:
    ds = gen.generate(9, seed=0, size=size)
    assert len(ds) == 9
    assert ds.images.shape == (9, size, size, 3) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (9,) and ds.labels.dtype == np.int64
    assert set(ds.labels.tolist()) <= {0, 1}
    assert all(len(f) == 9 for f in _fields(ds))


@pytest.mark.parametrize("n", [1, 2, 63, 64, 1001])
def test_labels_balanced(n: int) -> None:
    labels = gen.generate(n, seed=n).labels
    assert abs(int(labels.sum()) - (n - int(labels.sum()))) <= 1


def test_every_shape_and_colour_present(big: gen.Dataset) -> None:
    assert len(gen.SHAPES) >= 3 and len(gen.COLOURS) >= 4
    assert set(zip(big.shapes, big.colours, strict=True)) == {(s, c) for s in gen.SHAPES for c in gen.COLOURS}
    assert set(zip(big.said_shapes, big.said_colours, strict=True)) == {(s, c) for s in gen.SHAPES for c in gen.COLOURS}


def test_caption_names_one_colour_and_one_shape(big: gen.Dataset) -> None:
    for caption, said_shape, said_colour in zip(big.captions, big.said_shapes, big.said_colours, strict=True):
        words = text_to_word_sequence(caption)
        assert [w for w in words if w in gen.COLOURS] == [said_colour], caption
        assert [w for w in words if w in gen.SHAPES] == [said_shape], caption


def test_caption_matches_image_iff_label(big: gen.Dataset) -> None:
    for i in range(len(big)):
        same = big.said_shapes[i] == big.shapes[i] and big.said_colours[i] == big.colours[i]
        assert same == (big.labels[i] == 1), i


def test_all_three_kinds_of_mismatch(big: gen.Dataset) -> None:
    names = {(True, False): "colour", (False, True): "shape", (True, True): "both"}
    kinds: collections.Counter[str] = collections.Counter()
    for i in np.flatnonzero(big.labels == 0):
        differs = (big.said_colours[i] != big.colours[i], big.said_shapes[i] != big.shapes[i])
        kinds[names[differs]] += 1
    negatives = int((big.labels == 0).sum())
    assert set(kinds) == {"colour", "shape", "both"}
    # A third each (1000 negatives: ~333 ± 15).
    assert all(abs(k / negatives - 1 / 3) < 0.07 for k in kinds.values()), kinds


def test_neither_modality_alone_predicts_the_label(big: gen.Dataset) -> None:
    # Every attribute is (nearly) equally frequent among matches and mismatches, for the image
    # and for the caption; otherwise a single-modality model could beat chance.
    for values, choices in (
        (big.shapes, gen.SHAPES),
        (big.colours, gen.COLOURS),
        (big.said_shapes, gen.SHAPES),
        (big.said_colours, gen.COLOURS),
    ):
        arr = np.array(values)
        for choice in choices:
            pos = float(np.mean(arr[big.labels == 1] == choice))
            neg = float(np.mean(arr[big.labels == 0] == choice))
            assert abs(pos - neg) < 0.08, (choice, pos, neg)


def test_images_show_the_listed_colour() -> None:
    ds = gen.generate(200, seed=11)
    nominal = np.array(list(gen.COLOURS.values()), np.int16)
    for image, colour in zip(ds.images, ds.colours, strict=True):
        # Pixels within the fill's jitter of each nominal colour; the drawn one must dominate.
        close = np.abs(image.astype(np.int16)[:, :, None, :] - nominal).max(-1) <= 25
        counts = close.reshape(-1, len(nominal)).sum(0)
        assert list(gen.COLOURS)[int(counts.argmax())] == colour
        assert counts.max() >= 50


def test_splits_use_distinct_seeds() -> None:
    sets = [ds for seed in (0, 1, 2) for ds in gen.splits(200, seed, size=32)]
    train, val, test = sets[:3]
    assert len(train) == 200 and len(val) == len(test) == 64
    assert gen.splits(1000, 0, size=32)[1].images.shape[0] == 200
    # No two splits (of one seed or across seeds) share their data.
    for i, a in enumerate(sets):
        for b in sets[i + 1 :]:
            assert not np.array_equal(a.images[:8], b.images[:8])
            assert a.captions[:8] != b.captions[:8]
    # Splits are deterministic too.
    again = gen.splits(200, 1, size=32)
    assert all(np.array_equal(x.images, y.images) for x, y in zip(again, sets[3:6], strict=True))


def test_export_parity_samples_are_held_out_from_training() -> None:
    """No image the export's parity check uses is one the default training (any of seeds 0-2) saw."""
    parity = {image.tobytes() for image in gen.generate(PARITY_SAMPLES, PARITY_SEED).images}
    for seed in range(3):
        for split in gen.splits(DEFAULT_SAMPLES, seed):
            seen = {image.tobytes() for image in split.images}
            assert not parity & seen, f"seed {seed}: parity samples were trained on"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        gen.generate(0, seed=0)
    with pytest.raises(ValueError, match="hexagon"):
        gen.draw("hexagon", "red", np.random.default_rng(0))
