"""The ``fusionserve`` command line: train, export, serve, demo and client commands.

Heavy imports (TensorFlow, onnxruntime, grpc) happen inside each command, so ``serve`` never
loads TensorFlow and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fusionserve.errors import FusionServeError

logger = logging.getLogger("fusionserve.cli")

Handler = Callable[[argparse.Namespace], int]


def _quiet_tensorflow() -> None:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cmd_train(args: argparse.Namespace) -> int:
    """Train the models and print their metrics."""
    _quiet_tensorflow()
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
    _quiet_tensorflow()
    from fusionserve.export.convert import export_files, export_from_dir

    own = [args.image_model, args.text_model, args.fusion_model, args.vocab]
    if args.source and any(own):
        raise FusionServeError("use either --from DIR or the four --*-model/--vocab options, not both")
    if args.source:
        result = export_from_dir(args.source, args.repository, opset=args.opset)
    elif all(own):
        result = export_files(*own, args.repository, labels_file=args.labels, opset=args.opset)
    else:
        raise FusionServeError(
            "give --from DIR (from 'fusionserve train') or all of --image-model, --text-model, "
            "--fusion-model and --vocab"
        )
    _print_export(result)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train → export → serve → classify, end to end."""
    _quiet_tensorflow()
    from fusionserve.demo import run_demo

    return run_demo(Path(args.workdir), samples=args.samples, epochs=args.epochs, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="fusionserve", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the image, text and fusion models on generated data")
    p.add_argument("--out", type=Path, required=True, help="folder for the .keras files and metrics.json")
    p.add_argument("--backbone", choices=["small", "vgg16"], default="small")
    p.add_argument("--samples", type=int, default=5000, help="training pairs (held-out sets: 20%% each)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="convert Keras models to ONNX into a model repository")
    p.add_argument("--from", dest="source", type=Path, help="folder written by 'fusionserve train'")
    p.add_argument("--image-model", type=Path)
    p.add_argument("--text-model", type=Path)
    p.add_argument("--fusion-model", type=Path)
    p.add_argument("--vocab", type=Path, help="vocabulary JSON (as 'fusionserve train' writes it)")
    p.add_argument("--labels", type=Path, help="JSON list of class labels (optional)")
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="train → export → serve → classify, end to end")
    p.add_argument("--workdir", default="fusionserve-demo", help="where models and the repository go")
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    registers = []
    for module in ("fusionserve.server.cli", "fusionserve.client.cli"):
        try:
            registers.append(__import__(module, fromlist=["register"]).register)
        except ModuleNotFoundError as e:
            if not module.startswith(e.name or ""):
                raise
    return registers


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fusionserve`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # tf2onnx logs every optimiser pass at INFO; keep its warnings only.
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (FusionServeError, ValueError) as e:
        print(f"fusionserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
