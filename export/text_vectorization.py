"""Lift a Keras 3 ``TextVectorization`` layer out of a text model (imports Keras).

The server tokenises without TensorFlow, so a text model that starts with ``TextVectorization`` is
split at export: the layer's vocabulary and settings become a :class:`~fusionserve.preprocess.Vocabulary`
(ASCII lower-casing, punctuation stripped, whitespace or character split, padding and truncation at
the back to ``output_sequence_length``), and the rest of the model, fed token ids, is converted.
Settings the server cannot reproduce are refused with a message naming them.
"""

from __future__ import annotations

from fusionserve.errors import ExportError
from fusionserve.preprocess import LOWER_ASCII, SPLIT_CHARACTER, SPLIT_WHITESPACE, Vocabulary

# What TextVectorization's "strip_punctuation" removes (its regular expression's character class).
STRIP_PUNCTUATION = "!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~'"
_STANDARDIZE = {  # standardize → (lower, filters)
    "lower_and_strip_punctuation": (LOWER_ASCII, STRIP_PUNCTUATION),
    "lower": (LOWER_ASCII, ""),
    "strip_punctuation": (False, STRIP_PUNCTUATION),
    None: (False, ""),
}
_SPLIT = {"whitespace": SPLIT_WHITESPACE, "character": SPLIT_CHARACTER}


def find(model):
    """The model's TextVectorization layer, or None; ExportError if one sits anywhere but at its input."""
    import keras

    found = [layer for layer in model.layers if isinstance(layer, keras.layers.TextVectorization)]
    if not found:
        return None
    layer = found[0]
    if len(found) > 1 or len(model.inputs) != 1 or layer.input is not model.inputs[0]:
        raise ExportError(f"text model: TextVectorization layer {layer.name!r} must be the first layer, applied to "
                          "the model's only input, for the server to tokenise in its place")  # fmt: skip
    return layer


def vocabulary(layer) -> Vocabulary:
    """The layer's tokenisation as a vocabulary; ExportError naming a setting the server cannot reproduce."""
    config = layer.get_config()
    where = f"text model: TextVectorization layer {layer.name!r}"
    standardize, split = config.get("standardize"), config.get("split")
    refusals = {
        "output_mode": (config.get("output_mode") != "int", "only output_mode='int' feeds token ids to a model"),
        "standardize": (callable(standardize) or standardize not in _STANDARDIZE,
                        f"only {sorted(str(k) for k in _STANDARDIZE)} can be reproduced without TensorFlow"),
        "split": (callable(split) or split not in _SPLIT, f"only {sorted(_SPLIT)} can be reproduced"),
        "ngrams": (config.get("ngrams") is not None, "n-grams are not reproduced"),
        "output_sequence_length": (config.get("output_sequence_length") is None,
                                   "set it: the server pads every text to one length"),
        "ragged": (bool(config.get("ragged")), "the server pads every text to one length"),
    }  # fmt: skip
    for setting, (refused, why) in refusals.items():
        if refused:
            raise ExportError(f"{where}: {setting}={config.get(setting)!r} is not supported: {why}")
    tokens = [str(t) for t in layer.get_vocabulary()]
    if tokens[:1] != [""] or len(tokens) < 2:
        raise ExportError(f"{where}: expected padding '' at index 0 and the out-of-vocabulary token at 1, "
                          f"has {tokens[:2]}")  # fmt: skip
    lower, filters = _STANDARDIZE[standardize]
    return Vocabulary(
        {t: i for i, t in enumerate(tokens) if i >= 2},
        max_words=len(tokens),
        max_length=int(config["output_sequence_length"]),
        padding="post",
        truncating="post",
        pad_value=0,
        oov_index=1,
        oov_token=tokens[1],
        lower=lower,
        filters=filters,
        filter_replacement="",
        split=_SPLIT[split],
    )


def lift(model):
    """``(vocabulary, model on token ids)`` for a model that starts with TextVectorization, else ``(None, model)``.

    The returned model takes int32 ids ``[N, output_sequence_length]`` (named ``tokens``) and shares
    the original's layers and weights.
    """
    import keras

    layer = find(model)
    if layer is None:
        return None, model
    vocab = vocabulary(layer)
    rest = keras.Model(layer.output, model.outputs[0])
    tokens = keras.Input((vocab.max_length,), dtype="int32", name="tokens")
    return vocab, keras.Model(tokens, rest(tokens), name=f"{model.name}_on_tokens")
