"""Dynamic batching: off vs on by concurrency, at the same offered load, and the queue-delay trade-off.

One item per typed unary ``Classify`` call, from the project's load generator
(``fusionserve.client.loadgen``) in this process, against ``fusionserve serve`` in a child process:

1. batching off (``--max-batch-size 1``) vs on (the default ``--max-queue-delay-ms``) at
   concurrency 1, 4, 16 and 64 (closed loop: each caller sends its next call when the last returns);
2. both at the *same* offered load (open loop, a fixed arrival rate: a fraction of batching off's
   best throughput; latency from each call's intended time), the fair test of "p99 no worse than
   batching off at the same throughput";
3. ``--max-queue-delay-ms`` 0, 1, 2, 5, 10, 20 at concurrency 16 (plot: p99 against items/s).

The server's mean image-encoder batch size (from its Prometheus metrics) shows batching at work.

    python bench/batching.py [--repository REPO] [--duration 5] [--smoke] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from _common import ServerProcess, load, machine, pyplot, repository, result_name, samples, save_figure, write

from fusionserve.server.settings import ServerSettings

CONCURRENCY = (1, 4, 16, 64)
DELAYS_MS = (0, 1, 2, 5, 10, 20)
SWEEP_CONCURRENCY = 16
BATCH_MODEL = "image_encoder"  # the model whose batch sizes are reported
DEFAULT_DELAY_MS = ServerSettings().max_queue_delay_ms


def mean_batch(server: ServerProcess, before: dict[str, tuple[float, float]]) -> float:
    """Mean rows per image-encoder run since ``before``."""
    after = server.histogram("fusionserve_batch_size").get(BATCH_MODEL, (0.0, 0.0))
    rows, runs = after[0] - before.get(BATCH_MODEL, (0.0, 0.0))[0], after[1] - before.get(BATCH_MODEL, (0.0, 0.0))[1]
    return rows / runs if runs else float("nan")


def measure(server: ServerProcess, items: list, duration_s: float, **settings: Any) -> dict[str, Any]:
    """One load-generator run of one-item typed unary calls, with the server's mean batch size during it."""
    before = server.histogram("fusionserve_batch_size")
    result = load(server.target, items, duration_s=duration_s, **settings)
    result["mean_batch"] = mean_batch(server, before)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for CI (no claims)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--paced-fraction", type=float, default=0.8,
                        help="open-loop rate as a fraction of batching off's best throughput")  # fmt: skip
    args = parser.parse_args()
    duration = 0.4 if args.smoke else args.duration
    repo = repository(args.repository, smoke=args.smoke)
    items = samples(512)
    dev = ("--device", args.device)
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {"duration_s": duration, "items_per_call": 1, "concurrency": CONCURRENCY,
                     "delays_ms": DELAYS_MS, "sweep_concurrency": SWEEP_CONCURRENCY, "device": args.device,
                     "paced_fraction": args.paced_fraction, "repository": str(repo),
                     "off": "--max-batch-size 1", "on": f"--max-queue-delay-ms {DEFAULT_DELAY_MS:g} (default)"},
    }  # fmt: skip

    closed: dict[str, dict[int, dict]] = {"off": {}, "on": {}}
    paced: dict[str, dict] = {}
    modes = {"off": ("--max-batch-size", "1"), "on": ("--max-queue-delay-ms", f"{DEFAULT_DELAY_MS:g}")}
    rate = 0.0
    for mode, flags in modes.items():
        with ServerProcess(repo, *dev, *flags, metrics_port=0) as server:
            for c in CONCURRENCY:
                closed[mode][c] = measure(server, items, duration, concurrency=c)
            if mode == "off":  # the open-loop rate both servers are offered
                rate = args.paced_fraction * max(r["items_per_s"] for r in closed["off"].values())
            paced[mode] = measure(server, items, max(duration, 1.0), rate=rate)

    sweep: dict[float, dict] = {}
    for delay in DELAYS_MS:
        with ServerProcess(repo, *dev, "--max-queue-delay-ms", str(delay), metrics_port=0) as server:
            sweep[delay] = measure(server, items, duration, concurrency=SWEEP_CONCURRENCY)

    results["closed_loop"] = {m: {str(c): v for c, v in r.items()} for m, r in closed.items()}
    results["open_loop"] = paced
    results["delay_sweep"] = {str(d): v for d, v in sweep.items()}
    ratios = results["ratios"] = {
        **{f"throughput_on_vs_off_c{c}": closed["on"][c]["items_per_s"] / closed["off"][c]["items_per_s"]
           for c in CONCURRENCY},
        **{f"p99_on_vs_off_c{c}": closed["on"][c]["p99_ms"] / closed["off"][c]["p99_ms"] for c in CONCURRENCY},
        "p99_on_vs_off_same_offered_load": paced["on"]["p99_ms"] / paced["off"]["p99_ms"],
        **{f"throughput_delay{d}_vs_delay0": sweep[d]["items_per_s"] / sweep[0]["items_per_s"] for d in DELAYS_MS},
        **{f"p99_delay{d}_vs_delay0": sweep[d]["p99_ms"] / sweep[0]["p99_ms"] for d in DELAYS_MS},
    }  # fmt: skip

    print(f"closed loop, 1 item per call ({duration:g}s each); on/off = batching on ÷ off")
    print(f"{'callers':>7} | {'off items/s':>11}{'p50 ms':>8}{'p99 ms':>8}{'batch':>6} | "
          f"{'on items/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'batch':>6} | "
          f"{'items/s on/off':>14}{'p99 on/off':>11}")  # fmt: skip
    for c in CONCURRENCY:
        off, on = closed["off"][c], closed["on"][c]
        print(f"{c:>7} | {off['items_per_s']:>11.0f}{off['p50_ms']:>8.2f}{off['p99_ms']:>8.2f}{off['mean_batch']:>6.1f}"
              f" | {on['items_per_s']:>10.0f}{on['p50_ms']:>8.2f}{on['p99_ms']:>8.2f}{on['mean_batch']:>6.1f}"
              f" | {ratios[f'throughput_on_vs_off_c{c}']:>14.2f}{ratios[f'p99_on_vs_off_c{c}']:>11.2f}")  # fmt: skip
    print(f"\nsame offered load: {rate:.0f} items/s open loop ({args.paced_fraction:.0%} of batching off's best)")
    print(f"{'':>7}   {'achieved/s':>11}{'p50 ms':>8}{'p99 ms':>8}{'batch':>6}{'errors':>7}")
    for mode in ("off", "on"):
        v = paced[mode]
        print(f"{mode:>7}   {v['items_per_s']:>11.0f}{v['p50_ms']:>8.2f}{v['p99_ms']:>8.2f}{v['mean_batch']:>6.1f}"
              f"{v['errors']:>7}")  # fmt: skip
    print(f"{'p99 on/off at the same load':<36}{ratios['p99_on_vs_off_same_offered_load']:>8.2f}"
          "  (≤ 1: batching costs no tail latency)")  # fmt: skip
    print(f"\nqueue delay sweep at {SWEEP_CONCURRENCY} callers")
    print(f"{'delay ms':>8}{'items/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'batch':>6}{'items/s ÷ d0':>14}{'p99 ÷ d0':>10}")
    for d in DELAYS_MS:
        v = sweep[d]
        tp, p99 = ratios[f"throughput_delay{d}_vs_delay0"], ratios[f"p99_delay{d}_vs_delay0"]
        print(f"{d:>8g}{v['items_per_s']:>10.0f}{v['p50_ms']:>8.2f}{v['p99_ms']:>8.2f}{v['mean_batch']:>6.1f}"
              f"{tp:>14.2f}{p99:>10.2f}")  # fmt: skip

    name = result_name("batching", smoke=args.smoke, device=args.device)
    plot(closed, paced, sweep, name, args.device)
    print("wrote", write(name, results))


def plot(closed: dict[str, dict[int, dict]], paced: dict[str, dict], sweep: dict[float, dict], name: str,
         device: str) -> None:  # fmt: skip
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, style in (("off", "o--"), ("on", "o-")):
        xs = [r["items_per_s"] for r in closed[mode].values()]
        ys = [r["p99_ms"] for r in closed[mode].values()]
        left.plot(xs, ys, style, label=f"batching {mode}")
        for c, x, y in zip(closed[mode], xs, ys, strict=True):
            left.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        left.plot([paced[mode]["items_per_s"]], [paced[mode]["p99_ms"]], "*", markersize=12,
                  color=left.lines[-1].get_color(), label=f"batching {mode}, same offered load")  # fmt: skip
    left.set(xlabel="items/s", ylabel="p99 latency (ms)", yscale="log",
             title=f"Batching off vs on, 1 item per call ({device})")  # fmt: skip
    left.legend()
    xs = [r["items_per_s"] for r in sweep.values()]
    ys = [r["p99_ms"] for r in sweep.values()]
    right.plot(xs, ys, "o-")
    for d, x, y in zip(sweep, xs, ys, strict=True):
        right.annotate(f"{d:g} ms", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    right.set(xlabel="items/s", ylabel="p99 latency (ms)",
              title=f"--max-queue-delay-ms at {SWEEP_CONCURRENCY} callers")  # fmt: skip
    print("wrote", save_figure(fig, name))
    plt.close(fig)


if __name__ == "__main__":
    main()
