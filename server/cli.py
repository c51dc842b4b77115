"""``fusionserve serve``: run the server from the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from fusionserve.extras import require
from fusionserve.server.settings import ServerSettings


def cmd_serve(args: argparse.Namespace) -> int:
    """Load settings (defaults < --config < FUSIONSERVE_* env < flags) and serve until SIGTERM."""
    require("server", "fusionserve serve")

    overrides = {
        "repository": args.repository,
        "model_control_mode": args.model_control_mode,
        "repository_poll_secs": args.repository_poll_secs,
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "metrics_port": args.metrics_port,
        "device": args.device,
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_ms": args.max_queue_delay_ms,
        "shutdown_grace_s": args.shutdown_grace_s,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "auth_token_file": args.auth_token_file,
        "max_connection_age_s": args.max_connection_age_s,
        "embedding_cache_mb": args.embedding_cache_mb,
        "queue_delay_target_ms": args.queue_delay_target_ms,
    }
    settings = ServerSettings.load(args.config, overrides=overrides)
    from fusionserve.server.tracing import check

    check(settings.trace_endpoint)  # asked to trace without the tracing extra: one line naming it, before any work
    logging.getLogger("fusionserve").setLevel(settings.log_level.upper())
    from fusionserve.server.supervisor import supervise, worker_count

    count, why = worker_count(settings)
    if count > 1:
        return asyncio.run(supervise(settings, count, why))
    if settings.workers == "auto":
        logging.getLogger(__name__).info("one process (%s)", why)
    from fusionserve.server.app import serve

    return asyncio.run(serve(settings))


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand (defaults, shown in the help, are ServerSettings')."""
    d = ServerSettings()
    p = sub.add_parser("serve", help="serve a model repository over gRPC")
    p.add_argument("--repository", type=Path, help=f"repository from 'fusionserve export' (default {d.repository})")
    p.add_argument("--model-control-mode", choices=["none", "poll", "explicit"],
                   help=f"pick up new versions: poll the repository, none, or explicit load/unload calls "
                        f"(default {d.model_control_mode})")  # fmt: skip
    p.add_argument("--repository-poll-secs", type=float,
                   help=f"seconds between repository reads in poll mode (default {d.repository_poll_secs:g})")
    p.add_argument("--host", help=f"bind address (default {d.host})")
    p.add_argument("--port", type=int, help=f"gRPC port (default {d.port})")
    p.add_argument("--workers", metavar="N|auto",
                   help=f"serving processes sharing the port: a number, or auto (one per usable core; 1 on "
                        f"CUDA or with explicit model control) (default {d.workers})")  # fmt: skip
    p.add_argument("--metrics-port", type=int, help=f"Prometheus port (default {d.metrics_port}, -1 disables)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help=f"execution provider (default {d.device})")
    p.add_argument("--max-batch-size", type=int, help="override every model's max batch size")
    p.add_argument("--max-queue-delay-ms", type=float, help=f"batch wait once busy (default {d.max_queue_delay_ms:g})")
    p.add_argument("--queue-delay-target-ms", type=float,
                   help=f"opt-in queue-time shedding: refuse new work that would wait longer than this to "
                        f"start, 0 = off (default {d.queue_delay_target_ms:g}; deadlines shed anyway)")  # fmt: skip
    p.add_argument("--embedding-cache-mb", type=float,
                   help=f"memory for cached encoder outputs, 0 = off (default {d.embedding_cache_mb:g})")
    p.add_argument("--shutdown-grace-s", type=float, help=f"drain time on SIGTERM (default {d.shutdown_grace_s:g})")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate: serve TLS only")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, help="PEM CA: require client certificates (mutual TLS)")
    p.add_argument("--auth-token-file", type=Path, help="accepted bearer tokens, one per line")
    p.add_argument("--max-connection-age-s", type=float, help="recycle client connections (0 = never)")
    p.add_argument("--config", type=Path, help="JSON file with any ServerSettings field")
    p.set_defaults(func=cmd_serve)
