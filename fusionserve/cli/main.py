"""The ``fusionserve`` command line: train, export, serve, demo and client commands.

Each part registers its own subcommands; heavy imports (TensorFlow, onnxruntime, grpc) happen
inside each command, so ``serve`` never loads TensorFlow and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from fusionserve.errors import FusionServeError

# Modules with a ``register(subparsers)`` function, in the order their commands are listed.
COMMAND_MODULES = ("fusionserve.export.cli", "fusionserve.server.cli", "fusionserve.cli.demo", "fusionserve.client.cli")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="fusionserve", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


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
