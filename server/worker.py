"""One worker of ``fusionserve serve --workers N``, as the supervisor starts it (never by hand).

    python -m fusionserve.server.worker --settings FILE --worker K --supervisor PID

``FILE`` holds the supervisor's settings (the port it reserved, no metrics port of its own); the
supervisor also sets ``PROMETHEUS_MULTIPROC_DIR`` so this process's metrics go to its files. The
worker prints ``ready`` on stdout once it serves (the supervisor's signal), logs to stderr like
``fusionserve serve``, and drains on SIGTERM, which the kernel also sends if the supervisor dies.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from fusionserve.errors import FusionServeError

READY = "ready"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(supervisor: int) -> None:
    """Get SIGTERM (and so drain) when the supervisor dies, even by kill -9: no orphan keeps the port."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve as worker ``--worker`` until SIGTERM; 0 after a drain, 2 when the server cannot start."""
    parser = argparse.ArgumentParser(prog="fusionserve.server.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--settings", type=Path, required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--supervisor", type=int, required=True)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s %(name)s [worker {args.worker}]: %(message)s",
        stream=sys.stderr,
    )
    _die_with(args.supervisor)
    from fusionserve.server.app import serve
    from fusionserve.server.settings import ServerSettings

    def started() -> None:
        print(READY, flush=True)

    try:
        settings = ServerSettings.load(args.settings, env={})  # the supervisor's, environment included
        logging.getLogger("fusionserve").setLevel(settings.log_level.upper())
        return asyncio.run(serve(settings, worker=args.worker, on_started=started))
    except (FusionServeError, ValueError, OSError) as e:
        print(f"fusionserve serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
