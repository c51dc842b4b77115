"""Train the image encoder, text encoder and fusion head wired together (imports TensorFlow).

Recipe: the fused model is trained on the match label, with auxiliary heads that name the
image's shape and colour (from image features) and the caption's (from text features). The aux
heads make both encoders learn the attributes early, so the fusion head only has to compare them;
they are dropped after training. The single-modality probes use the same recipe with the other
modality removed, and show that neither modality alone predicts the label.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusionserve import data as gen
from fusionserve.export import DEFAULT_EPOCHS, DEFAULT_SAMPLES
from fusionserve.preprocess import Vocabulary
from fusionserve.repository import write_json

logger = logging.getLogger(__name__)

BATCH_SIZE = 64


@dataclass(frozen=True)
class TrainResult:
    """Where the models went and how well they did."""

    out: Path
    metrics: dict


def _attribute_targets(names: list[str], vocabulary: tuple[str, ...] | list[str]) -> np.ndarray:
    index = {n: i for i, n in enumerate(vocabulary)}
    return np.array([index[n] for n in names], np.int64)


def _fit(model, inputs, targets, validation, epochs: int, label: str, progress: bool) -> None:
    """Fit; with ``progress``, Keras' display (a bar on a terminal, a line per epoch otherwise)."""
    logger.info("training %s for %d epochs", label, epochs)
    model.fit(
        inputs,
        targets,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        validation_data=validation,
        verbose=(1 if sys.stdout.isatty() else 2) if progress else 0,
        shuffle=True,
    )


def _accuracy(model, inputs, labels: np.ndarray) -> float:
    """Accuracy of the first output, by direct calls in batches (``predict`` retraces its graph per model)."""
    parts = inputs if isinstance(inputs, list) else [inputs]
    correct = 0
    for start in range(0, len(labels), BATCH_SIZE):
        batch = [p[start : start + BATCH_SIZE] for p in parts]
        probs = model(batch if len(batch) > 1 else batch[0], training=False)
        if isinstance(probs, (list, tuple)):
            probs = probs[0]
        correct += int((np.asarray(probs).argmax(1) == labels[start : start + BATCH_SIZE]).sum())
    return correct / len(labels)


def train(
    out: Path,
    *,
    backbone: str = "small",
    samples: int = DEFAULT_SAMPLES,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    probes: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Generate data, train the three models wired together, save them and ``metrics.json``.

    Writes ``image_encoder.keras``, ``text_encoder.keras``, ``fusion.keras``, ``vocab.json``,
    ``labels.json`` and ``metrics.json`` into ``out``.
    """
    import keras
    from keras import layers

    from fusionserve.export import models

    if samples < 64:
        raise ValueError("--samples must be at least 64")
    if epochs < 1:
        raise ValueError("--epochs must be at least 1")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    keras.utils.set_random_seed(seed)

    size = models.BACKBONES[backbone]
    train_set, val_set, test_set = gen.splits(samples, seed, size)
    vocab = Vocabulary.fit(train_set.captions, models.VOCAB_SIZE, models.MAX_TOKENS).with_padding(
        padding=models.PADDING, truncating=models.PADDING
    )

    def model_inputs(ds: gen.Dataset) -> tuple[np.ndarray, np.ndarray]:
        return ds.images.astype(np.float32) / np.float32(255.0), vocab.encode(ds.captions)

    def aux_targets(ds: gen.Dataset, image: bool, text: bool) -> list[np.ndarray]:
        targets = []
        if image:
            targets += [_attribute_targets(ds.shapes, gen.SHAPES), _attribute_targets(ds.colours, list(gen.COLOURS))]
        if text:
            targets += [
                _attribute_targets(ds.said_shapes, gen.SHAPES),
                _attribute_targets(ds.said_colours, list(gen.COLOURS)),
            ]
        return targets

    def aux_heads(features, prefix: str) -> list:
        return [
            layers.Dense(len(gen.SHAPES), activation="softmax", name=f"{prefix}_shape")(features),
            layers.Dense(len(gen.COLOURS), activation="softmax", name=f"{prefix}_colour")(features),
        ]

    def compile_(model) -> None:
        n_out = len(model.outputs)
        model.compile(keras.optimizers.Adam(2e-3), ["sparse_categorical_crossentropy"] * n_out)

    x_train, x_val, x_test = model_inputs(train_set), model_inputs(val_set), model_inputs(test_set)

    image_encoder = models.image_encoder(backbone)
    text_encoder = models.text_encoder()
    fusion = models.fusion_head()
    fused = models.wire(image_encoder, text_encoder, fusion)
    trainer = keras.Model(
        fused.inputs,
        [fused.output, *aux_heads(image_encoder.output, "image"), *aux_heads(text_encoder.output, "text")],
    )
    compile_(trainer)
    _fit(
        trainer,
        list(x_train),
        [train_set.labels, *aux_targets(train_set, True, True)],
        (list(x_val), [val_set.labels, *aux_targets(val_set, True, True)]),
        epochs,
        "the fused model (image + text)",
        progress,
    )
    metrics: dict = {
        "backbone": backbone,
        "image_size": size,
        "samples": samples,
        "epochs": epochs,
        "seed": seed,
        "test_samples": len(test_set),
        "fused_test_accuracy": _accuracy(fused, list(x_test), test_set.labels),
    }

    if probes:
        for modality in ("image", "text"):
            encoder = models.image_encoder(backbone) if modality == "image" else models.text_encoder()
            hidden = layers.Dense(64, activation="relu")(encoder.output)
            head = layers.Dense(2, activation="softmax", name="probabilities")(hidden)
            probe = keras.Model(encoder.input, [head, *aux_heads(encoder.output, modality)])
            compile_(probe)
            index = 0 if modality == "image" else 1
            _fit(
                probe,
                x_train[index],
                [train_set.labels, *aux_targets(train_set, modality == "image", modality == "text")],
                (x_val[index], [val_set.labels, *aux_targets(val_set, modality == "image", modality == "text")]),
                epochs,
                f"the {modality}-only probe",
                progress,
            )
            metrics[f"{modality}_only_test_accuracy"] = _accuracy(probe, x_test[index], test_set.labels)

    image_encoder.save(out / "image_encoder.keras")
    text_encoder.save(out / "text_encoder.keras")
    fusion.save(out / "fusion.keras")
    vocab.save(out / "vocab.json")
    write_json(out / "labels.json", list(gen.LABELS))
    metrics["train_seconds"] = round(time.perf_counter() - started, 1)
    write_json(out / "metrics.json", metrics)
    logger.info("trained models written to %s: %s", out, json.dumps(metrics))
    return TrainResult(out, metrics)
