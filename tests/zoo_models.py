"""The zoo: Keras image encoders, text encoders and fusion heads of common architectures (imports Keras).

Random weights, small inputs where the family allows it; built the way a user writes them. Used by
the zoo test (tests/test_zoo.py) and the export benchmark (bench/zoo.py).
"""

from __future__ import annotations

IMAGE_ENCODERS = ("VGG16", "MobileNetV2", "ResNet50", "EfficientNetB0", "cnn")  # keras.applications names, and ours
TEXT_ENCODERS = ("lstm", "gru", "bilstm", "conv1d", "transformer")
FUSIONS = ("mlp", "concat", "gated")


def image_model(kind: str, size: int, features: int):
    """``image`` float32 [N, size, size, 3] → features: a keras.applications backbone + pooling, or a plain CNN."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 3), name="image")
    if kind == "cnn":
        x = layers.Conv2D(8, 3, activation="relu")(inputs)
        x = layers.GlobalAveragePooling2D()(layers.MaxPooling2D()(layers.Conv2D(8, 3, activation="relu")(x)))
    else:
        base = getattr(keras.applications, kind)(include_top=False, weights=None, input_tensor=inputs)
        x = layers.GlobalAveragePooling2D()(base.output)
    return keras.Model(inputs, layers.Dense(features)(x), name="my_image_model")


def calibrate(model, inputs) -> None:
    """Scale the model's last Dense layer so its outputs on ``inputs`` have unit spread.

    Random weights leave some deep families' features vanishingly small (MobileNetV2 about 1e-12,
    EfficientNetB0 about 1e-8 at 32×32): the fusion head would hardly see the image, and a wrong
    image preprocessing could pass unseen. Trained models do not look like that; calibrated ones neither.
    """
    import numpy as np

    dense = model.layers[-1]
    spread = float(np.asarray(model(inputs)).std())
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel / spread, bias / spread])


def text_model(kind: str, length: int, features: int, rows: int, vectorizer=None):
    """Token ids [N, length] (or strings through ``vectorizer``, a TextVectorization) → features."""
    import keras
    from keras import layers

    if vectorizer is None:
        inputs = x = keras.Input((length,), dtype="int32", name="ids")
    else:
        inputs = keras.Input((1,), dtype="string", name="caption")
        x = vectorizer(inputs)
    x = layers.Embedding(rows, 16)(x)
    if kind == "lstm":
        x = layers.LSTM(features)(x)
    elif kind == "gru":
        x = layers.GRU(features, unroll=True)(x)  # Keras 3's GRU becomes a Loop in tf2onnx otherwise (refused)
    elif kind == "bilstm":
        x = layers.Bidirectional(layers.LSTM(features // 2))(x)
    elif kind == "conv1d":
        x = layers.GlobalMaxPooling1D()(layers.Conv1D(features, 3, activation="relu")(x))
    else:  # a small Transformer block
        attended = layers.MultiHeadAttention(num_heads=2, key_dim=8)(x, x)
        x = layers.LayerNormalization()(x + attended)
        x = layers.LayerNormalization()(x + layers.Dense(16, activation="relu")(x))
        x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, layers.Dense(features)(x), name="my_text_model")


def fusion_model(kind: str, features: int, classes: int = 2):
    """(image features, text features) → class probabilities (``mlp``, ``gated``) or the concatenation (``concat``)."""
    import keras
    from keras import layers

    image, text = keras.Input((features,), name="image_features"), keras.Input((features,), name="text_features")
    joined = layers.Concatenate()([image, text])
    if kind == "concat":
        return keras.Model([image, text], joined, name="my_fusion")
    if kind == "gated":
        gate = layers.Dense(features, activation="sigmoid")(joined)
        x = layers.Multiply()([gate, layers.Multiply()([image, text])])
    else:
        x = layers.Dense(64, activation="relu")(joined)
    return keras.Model([image, text], layers.Dense(classes, activation="softmax")(x), name="my_fusion")
