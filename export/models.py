"""Keras 3 builders for the image encoder, text encoder and fusion head (imports TensorFlow)."""

from __future__ import annotations

import keras
from keras import layers

IMAGE_FEATURES = 64
TEXT_FEATURES = 64
VOCAB_SIZE = 10_000
MAX_TOKENS = 100
PADDING = "post"  # the words first: the masked LSTM's last state is then ONNX's Y_h with sequence_lens
BACKBONES = {"small": 64, "vgg16": 224}


def image_encoder(backbone: str = "small") -> keras.Model:
    """``image`` float32 [N, H, W, 3] (BGR in [0, 1]) → ``image_features`` float32 [N, 64].

    ``small`` is a compact CNN at 64×64; ``vgg16`` is VGG16 without its top, global average
    pooling and Dense(64) at 224×224, with random weights (nothing is downloaded).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {sorted(BACKBONES)}")
    size = BACKBONES[backbone]
    inputs = keras.Input((size, size, 3), name="image")
    if backbone == "small":
        # A strided first layer: a quarter of the compute of a full-resolution one, and the
        # shapes (at least 10 px across) survive it.
        x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs)
        x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
        x = layers.Conv2D(48, 3, padding="same", activation="relu")(x)
        # Max pooling keeps a small shape's evidence wherever it sits in the picture.
        x = layers.GlobalMaxPooling2D()(x)
    else:
        vgg = keras.applications.VGG16(include_top=False, weights=None, input_tensor=inputs)
        x = layers.GlobalAveragePooling2D()(vgg.output)
    outputs = layers.Dense(IMAGE_FEATURES, name="image_features")(x)
    return keras.Model(inputs, outputs, name="image_encoder")


def text_encoder() -> keras.Model:
    """``tokens`` int32 [N, 100], padded at the back (:data:`PADDING`) → ``text_features`` float32 [N, 64].

    Embedding(10000, 128, mask_zero=True) → LSTM(64) → Dense(64). The mask makes the answer the
    same however much padding follows the words, so the export cuts each batch to its longest caption
    (export/variable_length.py); ``use_cudnn=False`` keeps the graph tf2onnx can turn into one ONNX
    ``LSTM`` op, also when exported on a GPU machine.
    """
    inputs = keras.Input((MAX_TOKENS,), dtype="int32", name="tokens")
    x = layers.Embedding(VOCAB_SIZE, 128, mask_zero=True)(inputs)
    x = layers.LSTM(64, use_cudnn=False)(x)
    outputs = layers.Dense(TEXT_FEATURES, name="text_features")(x)
    return keras.Model(inputs, outputs, name="text_encoder")


def fusion_head() -> keras.Model:
    """``image_features`` [N, 64] + ``text_features`` [N, 64] → ``probabilities`` [N, 2].

    The seed concatenates the two embeddings; we also concatenate their element-wise product,
    which lets a small classifier test "do these agree" directly.
    """
    image_features = keras.Input((IMAGE_FEATURES,), name="image_features")
    text_features = keras.Input((TEXT_FEATURES,), name="text_features")
    product = layers.Multiply()([image_features, text_features])
    x = layers.Concatenate()([image_features, text_features, product])
    x = layers.Dense(64, activation="relu")(x)
    outputs = layers.Dense(2, activation="softmax", name="probabilities")(x)
    return keras.Model([image_features, text_features], outputs, name="fusion")


def wire(image: keras.Model, text: keras.Model, fusion: keras.Model) -> keras.Model:
    """The three models joined end to end, for training: (image, tokens) → probabilities."""
    return keras.Model(
        [image.input, text.input], fusion([image.output, text.output]), name="multimodal"
    )
