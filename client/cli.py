"""Client commands of the ``fusionserve`` CLI: ``classify``, ``health``, ``models`` and ``loadtest``.

gRPC is imported inside each command, so ``fusionserve --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

_SCHEMES = ("ipv4:", "ipv6:", "unix:", "unix-abstract:", "dns:", "vsock:")


def _targets(args: argparse.Namespace) -> list[str]:
    # --target may repeat, and each may list replicas separated by commas (but a URI is kept whole).
    out: list[str] = []
    for value in args.target:
        whole = "://" in value or value.startswith(_SCHEMES)
        out += [value] if whole else [t.strip() for t in value.split(",") if t.strip()]
    return out


def _tls(args: argparse.Namespace) -> Any:
    from fusionserve.client.channel import TLSConfig

    if not (args.tls or args.ca_cert or args.client_cert or args.client_key):
        return None
    return TLSConfig.from_files(args.ca_cert, args.client_cert, args.client_key, args.server_name)


def _client(args: argparse.Namespace) -> Any:
    from fusionserve.client.sync import FusionClient

    target = _targets(args)
    # A one-shot command fails fast when nothing answers, rather than waiting for a replica.
    return FusionClient(
        target if len(target) > 1 else target[0],
        tls=_tls(args) or False,
        token=args.token,
        timeout_s=args.timeout_s,
        wait_for_ready=False,
    )


def cmd_classify(args: argparse.Namespace) -> int:
    """Classify one image + text pair."""
    with _client(args) as client:
        result = client.classify(
            args.image, args.text, model=args.model, model_version=args.model_version,
            return_embeddings=args.embeddings,
        )  # fmt: skip
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        scores = "  ".join(f"{label} {p:.4f}" for label, p in result.scores.items())
        print(f"{result.label}  (p={result.probability:.4f}; {scores}; {result.model} v{result.model_version})")
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    """One query against candidates: ``--image Q --text A --text B`` or ``--text Q --image A --image B``."""
    if len(args.image) == 1 and len(args.text) >= 1:
        query: dict[str, Any] = {"image": args.image[0], "texts": args.text}
        candidates: list[str] = list(args.text)
    elif len(args.text) == 1 and len(args.image) >= 1:
        query, candidates = {"text": args.text[0], "images": args.image}, [str(p) for p in args.image]
    else:
        raise ValueError("give one query and its candidates: --image Q --text A [--text B …] or "
                         "--text Q --image A [--image B …]")  # fmt: skip
    with _client(args) as client:
        ranking = client.rank(**query, top_k=args.top_k, model=args.model, model_version=args.model_version)
    if args.json:
        print(json.dumps([{"index": r.index, "candidate": candidates[r.index], "score": r.score} for r in ranking],
                         indent=2))  # fmt: skip
        return 0
    print(f"{'rank':>4}  {'score':>7}  candidate")
    for place, r in enumerate(ranking, 1):
        print(f"{place:>4}  {r.score:>7.4f}  {candidates[r.index]}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Print the health status; exit 0 only when SERVING."""
    with _client(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_models(args: argparse.Namespace) -> int:
    """List the server's models with their state; or load or unload one (explicit model control)."""
    if args.action in ("load", "unload") and not args.name:
        raise ValueError(f"models {args.action} needs a model name")
    with _client(args) as client:
        if args.action == "load":
            models = client.load_model(args.name)
        elif args.action == "unload":
            models = client.unload_model(args.name)
        else:
            models = client.models()
    if args.json:
        from dataclasses import asdict

        print(json.dumps([asdict(m) for m in models], indent=2))
        return 0
    print(f"{'model':<16}{'version':>8}  {'state':<12}{'platform':<18}{'max batch':>10}  providers / reason")
    for m in models:
        extra = m.reason or ", ".join(m.execution_providers) or ", ".join(m.steps)
        print(f"{m.name:<16}{m.version:>8}  {m.state:<12}{m.platform:<18}{m.max_batch_size:>10}  {extra}")
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    """Run a load test, print the summary, write the JSON report and the plot."""
    from fusionserve.client.loadgen import LoadSettings, run

    settings = LoadSettings(
        target=_targets(args),
        api=args.api,
        mode=args.mode,
        concurrency=args.concurrency,
        rate=args.rate,
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        batch_size=args.batch_size,
        inputs=args.inputs,
        model=args.model or "multimodal",
        timeout_s=args.timeout_s,
        streams=args.streams,
        max_inflight=args.max_inflight,
        connections=args.connections,
        progress=not args.quiet,
        tls=_tls(args),
        token=args.token,
    )
    report = run(settings)
    print(report.summary())
    if args.json:
        report.write_json(args.json)
        print(f"\nJSON report: {args.json}")
    if args.plot:
        report.plot(args.plot)
        print(f"Plot: {args.plot}")
    return 0 if report.results["ok"] else 1


def _connection_args(p: argparse.ArgumentParser, timeout_s: float) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--target", action="append", required=True,
                   help="HOST:PORT; repeat it (or separate with commas) for replicas balanced round-robin, "
                        "or one gRPC URI such as dns:///fusionserve-headless:8001")  # fmt: skip
    g.add_argument("--timeout-s", type=float, default=timeout_s, help=f"deadline per call (default {timeout_s:g})")
    g.add_argument("--tls", action="store_true", help="use TLS (with the system's roots unless --ca-cert)")
    g.add_argument("--ca-cert", type=Path, help="PEM CA bundle for the server certificate (implies --tls)")
    g.add_argument("--client-cert", type=Path, help="PEM client certificate, for mutual TLS")
    g.add_argument("--client-key", type=Path, help="PEM client key, for mutual TLS")
    g.add_argument("--server-name", help="name to verify the server certificate against")
    g.add_argument("--token", default=os.environ.get("FUSIONSERVE_TOKEN"),
                   help="bearer token (default: $FUSIONSERVE_TOKEN)")  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    """Add the client subcommands to the ``fusionserve`` parser."""
    p = sub.add_parser("classify", help="classify an image + text pair on a server")
    _connection_args(p, 10.0)
    p.add_argument("--image", required=True, type=Path, help="image file (PNG, JPEG, BMP or WebP)")
    p.add_argument("--text", required=True, help="the caption")
    p.add_argument("--model", default="", help="pipeline model (default: multimodal)")
    p.add_argument("--model-version", type=int, default=0, help="0 for the latest")
    p.add_argument("--embeddings", action="store_true", help="also return the embeddings (with --json)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("rank", help="rank candidates of one modality against a query of the other")
    _connection_args(p, 10.0)
    p.add_argument("--image", action="append", type=Path, default=[], help="an image file (query or candidate)")
    p.add_argument("--text", action="append", default=[], help="a text (query or candidate)")
    p.add_argument("--top-k", type=int, default=None, help="show only the best K")
    p.add_argument("--model", default="", help="pipeline model (default: multimodal)")
    p.add_argument("--model-version", type=int, default=0, help="0 for the latest")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("health", help="gRPC health check; exit 0 only when SERVING")
    _connection_args(p, 5.0)
    p.add_argument("--service", default="", help="a model name, or empty for the whole server")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("models", help="list a server's models, versions and states; load or unload one")
    _connection_args(p, 120.0)
    p.add_argument("action", nargs="?", choices=["list", "load", "unload"], default="list",
                   help="load/unload NAME: the server must run with --model-control-mode explicit")  # fmt: skip
    p.add_argument("name", nargs="?", help="the model to load or unload")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "loadtest",
        help="closed- or open-loop load test (latency percentiles, throughput, errors)",
        description=_LOADTEST_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _connection_args(p, 10.0)
    p.add_argument("--api", choices=["typed", "v2"], default="typed", help="fusionserve.v1 or KServe V2")
    p.add_argument("--mode", choices=["unary", "stream"], default="unary", help="unary calls or bidi streams")
    loop = p.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=int, default=8, help="closed loop: requests in flight (default 8)")
    loop.add_argument("--rate", type=float, help="open loop: requests per second, latency from the intended send")
    p.add_argument("--duration", "--duration-s", dest="duration_s", type=float, default=10.0,
                   help="measured seconds (default 10)")  # fmt: skip
    p.add_argument("--warmup", "--warmup-s", dest="warmup_s", type=float, default=1.0,
                   help="seconds of load before measuring (default 1)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=1, help="items per request (default 1)")
    p.add_argument("--inputs", default="generated",
                   help="'generated' or a folder of images (captions from captions.txt: FILE<TAB>caption, "
                        "else the file stem)")  # fmt: skip
    p.add_argument("--model", default="multimodal", help="pipeline model (default multimodal)")
    p.add_argument("--streams", type=int, default=0,
                   help="stream mode: streams to use (default: one per worker closed-loop, 4 open-loop)")  # fmt: skip
    p.add_argument("--max-inflight", type=int, default=10_000, help="open loop: cap on requests in flight")
    p.add_argument("--connections", type=int, default=1, help="HTTP/2 connections (default 1)")
    p.add_argument("--json", type=Path, help="write the JSON report here")
    p.add_argument("--plot", type=Path, help="write a PNG (latency over time, histogram) here; needs matplotlib")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_loadtest)


_LOADTEST_HELP = """Load-test a fusionserve server.

closed loop (--concurrency C): C requests in flight, each sent when the last is answered.
open loop (--rate R): R requests per second intended whatever the server does; latency counts
from each request's intended send time, so stalls are not hidden by coordinated omission.

Prints a summary (throughput, p50/p90/p99/p99.9/max, errors by status code); --json writes the
settings, machine and figures; --plot draws latency over time and the latency histogram.
"""
