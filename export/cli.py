"""Model commands of the ``fusionserve`` CLI: ``train`` and ``export`` (the ``export`` extra), ``import``.

TensorFlow is imported inside each command, quieted first, so ``fusionserve --help`` stays instant;
``import`` (ONNX files from elsewhere) needs no TensorFlow at all.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fusionserve.errors import FusionServeError
from fusionserve.export import DEFAULT_EPOCHS, DEFAULT_OPSET, DEFAULT_SAMPLES
from fusionserve.extras import require
from fusionserve.preprocessing_defaults import IMAGE_MODES, PAD_SEQUENCES_DEFAULTS, SIDES


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and let it find its devices without its C++ start-up lines in the output.

    TensorFlow's native code writes to file descriptor 2 while it loads (oneDNN and CPU-feature
    notices, "Could not find cuda drivers", a cuInit error on machines without a GPU), before any
    Python setting can quiet it: those writes go to a temporary file, shown only if the import fails.
    Python-level warnings and logs of TensorFlow stay at ERROR from then on.
    """
    import logging
    import os
    import sys
    import tempfile

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # the device probe (cuInit) happens here, not mid-training
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    tf.get_logger().setLevel(logging.ERROR)


def cmd_train(args: argparse.Namespace) -> int:
    """Train the models and print their metrics."""
    require("export", "fusionserve train")
    import_tensorflow_quietly()
    from fusionserve.export.train import train

    result = train(args.out, backbone=args.backbone, samples=args.samples, epochs=args.epochs, seed=args.seed)
    print(json.dumps(result.metrics, indent=2))
    return 0


def _print_export(result) -> None:
    print(f"{'model':<15}{'version':>8}{'max |Δ|':>12}{'ONNX bytes':>12}{'seconds':>9}")
    for m in result.models:
        print(f"{m.name:<15}{m.version:>8}{m.max_abs_diff:>12.2e}{m.onnx_bytes:>12,}{m.seconds:>9.1f}")
    print(f"{'multimodal':<15}{result.pipeline_version:>8}   (pipeline) → {result.repository}")


def cmd_export(args: argparse.Namespace) -> int:
    """Export trained models (or the user's own .keras files) into a model repository."""
    require("export", "fusionserve export")
    import_tensorflow_quietly()
    from fusionserve.export.convert import export_files, export_from_dir

    models = [args.image_model, args.text_model, args.fusion_model]
    if args.source and any([*models, args.tokenizer]):
        raise FusionServeError("use either --from DIR or the three --*-model options (and --tokenizer), not both")
    if args.source:
        result = export_from_dir(args.source, args.repository, opset=args.opset)
    elif all(models):
        _check_labels(args.labels)
        pad = {"maxlen": args.maxlen, "padding": args.padding, "truncating": args.truncating, "value": args.pad_value}
        result = export_files(*models, args.tokenizer, args.repository, labels_file=args.labels,
                              image_preprocessing_declared=args.image_preprocessing, pad_sequences=pad,
                              positive_label=args.positive_label, fusion_outputs=args.fusion_outputs,
                              opset=args.opset)  # fmt: skip
    else:
        raise FusionServeError(
            "give --from DIR (from 'fusionserve train') or all of --image-model, --text-model and --fusion-model "
            "(with --tokenizer unless the text model starts with TextVectorization)"
        )
    _print_export(result)
    return 0


def _check_labels(labels: Path | None) -> None:
    if labels is not None and not labels.is_file():
        raise FusionServeError(f"--labels {str(labels)!r} does not exist")


def cmd_import(args: argparse.Namespace) -> int:
    """Assemble a model repository from three ONNX files, a tokenizer and an image preprocessing declaration."""
    require("import", "fusionserve import")
    from fusionserve.export.onnx_import import import_files

    _check_labels(args.labels)
    pad = {"maxlen": args.maxlen, "padding": args.padding, "truncating": args.truncating, "value": args.pad_value}
    result = import_files(args.image_model, args.text_model, args.fusion_model, args.tokenizer, args.repository,
                          image_preprocessing_declared=args.image_preprocessing, pad_sequences=pad,
                          labels_file=args.labels, positive_label=args.positive_label,
                          fusion_outputs=args.fusion_outputs)  # fmt: skip
    _print_export(result)
    return 0


def _user_options(p: argparse.ArgumentParser, *, onnx: bool) -> None:
    """The options that describe a user's own models: tokenizer, padding, image preprocessing, labels."""
    kind = "ONNX" if onnx else ".keras"
    p.add_argument("--image-model", type=Path, required=onnx, help=f"{kind} image model: images → features")
    p.add_argument("--text-model", type=Path, required=onnx, help=f"{kind} text model: token ids → features")
    p.add_argument("--fusion-model", type=Path, required=onnx,
                   help=f"{kind} fusion model: (image features, text features) → class probabilities or features")
    p.add_argument("--tokenizer", "--vocab", dest="tokenizer", type=Path, required=onnx,
                   help="a Keras Tokenizer's to_json() or a fusionserve vocabulary JSON"
                   + ("" if onnx else " (not needed when the text model starts with TextVectorization)"))
    d = PAD_SEQUENCES_DEFAULTS
    p.add_argument("--maxlen", type=int, help="pad_sequences' maxlen (default: the text model's input length)")
    p.add_argument("--padding", choices=SIDES, help=f"pad_sequences' padding (default {d['padding']!r})")
    p.add_argument("--truncating", choices=SIDES, help=f"pad_sequences' truncating (default {d['truncating']!r})")
    p.add_argument("--pad-value", type=float, help=f"pad_sequences' value (default {d['value']})")
    p.add_argument("--image-preprocessing", metavar="MODE|FILE",
                   help=f"keras.applications' preprocess_input mode {sorted(IMAGE_MODES)} or a JSON file with "
                   "color_order, interpolation, scale, offset, mean, std (default: seed, BGR / 255)")
    p.add_argument("--labels", type=Path, help="JSON list of class labels (default: mismatch/match for 2 classes)")
    p.add_argument("--positive-label", help="the class Rank scores (default: the last label)")
    p.add_argument("--fusion-outputs", choices=["probabilities", "features"],
                   help="what the fusion model outputs (default: probabilities when its output layer is a "
                   "softmax or --labels is given, else features: an embedding pipeline)")  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` and ``export`` subcommands."""
    p = sub.add_parser("train", help="train the image, text and fusion models on generated data")
    p.add_argument("--out", type=Path, required=True, help="folder for the .keras files and metrics.json")
    p.add_argument("--backbone", choices=["small", "vgg16"], default="small")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="training pairs (held-out sets: 20%% each)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="convert Keras models to ONNX into a model repository")
    p.add_argument("--from", dest="source", type=Path, help="folder written by 'fusionserve train'")
    _user_options(p, onnx=False)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="assemble a model repository from ONNX files made elsewhere (no TensorFlow)")
    _user_options(p, onnx=True)
    p.add_argument("--repository", type=Path, required=True)
    p.set_defaults(func=cmd_import)
