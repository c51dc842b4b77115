"""The embedding cache and ``Rank`` on repeated multimodal traffic: cache on vs off, Rank vs Classify.

Two servers on the bench models, one with the default ``--embedding-cache-mb`` and one with 0 (off),
measured one at a time, in one run (``--parts`` picks some):

- ``zipf``: 1,000 distinct images and 1,000 distinct captions, each side drawn with a Zipf law
  (s = ``--zipf``) into pairs; typed unary one-item calls, closed loop, at 1 and 32 callers.
  Throughput, p50, p99, the cache's hit rate, and CPU per item of the server and of the client
  (the load generator, in this process, on the same cores).
- ``new``: the same with every pair new (no repeats): what the cache costs when it never hits.
- ``rank``: ``Rank`` of 1 image against 32 captions, against ``Classify`` of the same 32 pairs in one
  call and against 32 one-item ``Classify`` calls, one caller, taking turns call by call: with the
  cache off; on with everything new each call; on with a new image and the same 32 captions each
  call (zero-shot labels); on with the same call repeated.
- ``memory``: resident memory of the cache-on server before and after its cache is filled.

    python bench/fusion_cache.py [--duration 10] [--zipf 1.1] [--parts zipf,new,rank,memory]
                                 [--backbone small|vgg16] [--rank-calls 200] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
from _common import ServerProcess, load, machine, repository, result_name, samples, write

from fusionserve.client.loadgen.requests import typed_request
from fusionserve.data import COLOURS, SHAPES, TEMPLATES
from fusionserve.preprocess import Vocabulary
from fusionserve.server.settings import ServerSettings
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc

DISTINCT = 1000
CANDIDATES = 32
ENCODERS = ("image_encoder", "text_encoder")
PARTS = ("zipf", "new", "rank", "memory")


def captions(vocabulary: Vocabulary, n: int, seed: int) -> list[str]:
    """``n`` captions that are distinct as the text encoder sees them (distinct token ids)."""
    rng = np.random.default_rng(seed)
    words = sorted(vocabulary.word_index)
    bases = [t.format(colour=c, shape=s) for t in TEMPLATES for c in COLOURS for s in SHAPES]  # the training captions
    out: list[str] = []
    seen: set[bytes] = set()
    while len(out) < n:
        batch = [f"{bases[rng.integers(len(bases))]} and {' '.join(rng.choice(words, 4))}" for _ in range(n)]
        for text, tokens in zip(batch, vocabulary.encode(batch), strict=True):
            if tokens.tobytes() not in seen and len(out) < n:
                seen.add(tokens.tobytes())
                out.append(text)
    return out


def zipf_indices(n: int, count: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """``count`` draws from 0..n-1, the k-th most popular with probability ∝ 1 / k^s (popularity shuffled)."""
    weights = 1.0 / np.arange(1, n + 1) ** s
    return rng.permutation(n)[rng.choice(n, size=count, p=weights / weights.sum())]


def cache_counts(server: ServerProcess) -> np.ndarray:
    """(hits, misses) of both encoders so far."""
    return np.array([sum(server.metric(f'fusionserve_embedding_cache_{kind}_total{{model="{m}"}}') for m in ENCODERS)
                     for kind in ("hits", "misses")])  # fmt: skip


def measure(server: ServerProcess, payloads: list[bytes], concurrency: int, duration: float) -> dict:
    """One closed-loop run (no warm-up: the hit rate and CPU figures cover exactly the measured calls)."""
    counts, server_cpu, client_cpu = cache_counts(server), server.cpu_seconds(), time.process_time()
    out = load(server.target, payloads=payloads, duration_s=duration, concurrency=concurrency, warmup_s=0)
    client_cpu, server_cpu = time.process_time() - client_cpu, server.cpu_seconds() - server_cpu
    hits, misses = cache_counts(server) - counts
    items = out["items_per_s"] * duration
    out.update(hit_rate=hits / (hits + misses) if hits + misses else None,
               server_cpu_ms_per_item=server_cpu / items * 1e3, client_cpu_ms_per_item=client_cpu / items * 1e3)
    return out


def load_runs(on: ServerProcess, off: ServerProcess, workload: str, pairs: list[tuple[bytes, str]],
              concurrency: int, duration: float) -> dict[str, Any]:  # fmt: skip
    """The same load against the cache-off then the cache-on server, and their ratios."""
    payloads = [typed_request([pair], "multimodal") for pair in pairs]  # built before the CPU is counted
    row = {"off": measure(off, payloads, concurrency, duration), "on": measure(on, payloads, concurrency, duration)}
    row["throughput_ratio"] = row["on"]["items_per_s"] / row["off"]["items_per_s"]
    row["p50_ratio"] = row["on"]["p50_ms"] / row["off"]["p50_ms"]
    row["server_cpu_ratio"] = row["off"]["server_cpu_ms_per_item"] / row["on"]["server_cpu_ms_per_item"]
    print_load_row(f"{workload} c{concurrency}", row)
    return row


def rank_vs_classify(target: str, images: list[bytes], caption_sets: list[list[str]], n: int) -> dict[str, Any]:
    """Call k: Rank(images[k], caption_sets[k]), Classify of those 32 pairs, and 32 one-item Classify calls.

    Lists of one repeat the same call; the three kinds take turns, so the machine's noise falls
    on all alike. Median latency of each, after ``warm`` unmeasured rounds.
    """
    warm = min(3, max(1, n // 10))
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.FusionServiceStub(channel)

        def pick(k: int) -> tuple[bytes, list[str]]:
            return images[k % len(images)], caption_sets[k % len(caption_sets)]

        def rank(k: int) -> None:
            image, texts = pick(k)
            stub.Rank(pb.RankRequest(image=image, texts=texts), timeout=600)

        def classify(k: int) -> None:
            image, texts = pick(k)
            stub.Classify(pb.ClassifyRequest(items=[pb.Item(image=image, text=t) for t in texts]), timeout=600)

        def one_by_one(k: int) -> None:
            image, texts = pick(k)
            for text in texts:
                stub.Classify(pb.ClassifyRequest(items=[pb.Item(image=image, text=text)]), timeout=600)

        kinds: dict[str, Callable[[int], None]] = {"rank": rank, "classify": classify, "one_by_one": one_by_one}
        times: dict[str, list[float]] = {name: [] for name in kinds}
        for k in range(n + warm):
            for j, (name, call) in enumerate(kinds.items()):  # with new inputs, each kind gets its own
                started = time.perf_counter()
                call(3 * k + j)
                times[name].append((time.perf_counter() - started) * 1e3)
    p50 = {name: statistics.median(values[warm:]) for name, values in times.items()}
    return {**{f"{name}_p50_ms": value for name, value in p50.items()},
            "vs_classify": p50["classify"] / p50["rank"], "vs_one_by_one": p50["one_by_one"] / p50["rank"]}  # fmt: skip


def rank_part(on: ServerProcess, off: ServerProcess, vocabulary: Vocabulary, calls: int) -> dict[str, Any]:
    """Rank vs Classify in the four workloads (module docstring)."""
    rounds = 3 * (calls + 3)  # calls of each kind, warm-up included, times three kinds
    new_texts = captions(vocabulary, CANDIDATES * rounds, seed=9)
    new_sets = [new_texts[k : k + CANDIDATES] for k in range(0, len(new_texts), CANDIDATES)]
    labels = [captions(vocabulary, CANDIDATES, seed=10)]
    out = {  # each workload its own new images: none was seen by an earlier one
        "cache off": rank_vs_classify(off.target, [samples(1, seed=11)[0][0]], labels, calls),
        "cache on, everything new": rank_vs_classify(
            on.target, [image for image, _ in samples(rounds, seed=12)], new_sets, calls),
        "cache on, new image, same captions": rank_vs_classify(
            on.target, [image for image, _ in samples(rounds, seed=13)], labels, calls),
        "cache on, same call repeated": rank_vs_classify(on.target, [samples(1, seed=14)[0][0]], labels, calls),
    }  # fmt: skip
    print(f"\nRank of 1 image against {CANDIDATES} captions, one caller (p50 ms; how many times faster Rank is):")
    print(f"  {'':<36}{'Rank':>8}{'Classify 32':>13}{'32 calls':>10}{'vs Classify':>13}{'vs 32 calls':>13}")
    for name, r in out.items():
        print(f"  {name:<36}{r['rank_p50_ms']:>8.2f}{r['classify_p50_ms']:>13.2f}{r['one_by_one_p50_ms']:>10.2f}"
              f"{r['vs_classify']:>12.1f}x{r['vs_one_by_one']:>12.1f}x")  # fmt: skip
    return out


def memory_part(on: ServerProcess, off: ServerProcess, vocabulary: Vocabulary, max_bytes: int,
                image: bytes) -> dict[str, Any]:  # fmt: skip
    """Rank batches of new captions into the cache-on server until it evicts (full); RSS before and after."""
    rss_before = on.rss_mb()
    evictions, calls, seed = 0.0, 0, 1000
    with grpc.insecure_channel(on.target) as channel:
        stub = pb_grpc.FusionServiceStub(channel)
        while evictions == 0:
            texts = captions(vocabulary, 64 * 50, seed)
            seed += 1
            for k in range(0, len(texts), 64):
                stub.Rank(pb.RankRequest(image=image, texts=texts[k : k + 64]), timeout=60)
                calls += 1
            evictions = on.metric('fusionserve_embedding_cache_evictions_total{model="text_encoder"}')
    held = sum(on.metric(f'fusionserve_embedding_cache_bytes{{model="{m}"}}') for m in ENCODERS)
    out = {"rss_cache_off_mb": off.rss_mb(), "rss_before_mb": rss_before, "rss_full_mb": on.rss_mb(),
           "cache_bytes": held, "cache_max_bytes": max_bytes, "fill_calls": calls}  # fmt: skip
    print(f"\nresident memory: cache off {out['rss_cache_off_mb']:.0f} MiB; cache on {rss_before:.0f} MiB, "
          f"{out['rss_full_mb']:.0f} MiB with the cache full ({held / 2**20:.1f} of {max_bytes / 2**20:.0f} MiB held)")
    return out


def print_load_row(key: str, row: dict[str, Any]) -> None:
    if key.startswith(("zipf c1", "new c1")):
        print(f"{'workload':<10}{'cache':>6}{'items/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'hits':>6}{'errors':>7}"
              f"{'server CPU ms/item':>20}{'client CPU ms/item':>20}")  # fmt: skip
    for name in ("off", "on"):
        r = row[name]
        hits = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.0%}"
        print(f"{key:<10}{name:>6}{r['items_per_s']:>9.0f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}{hits:>6}"
              f"{r['errors']:>7}{r['server_cpu_ms_per_item']:>20.3f}{r['client_cpu_ms_per_item']:>20.3f}")  # fmt: skip
    print(f"{'':<10}{'on/off':>6}{row['throughput_ratio']:>8.2f}x{row['p50_ratio']:>7.2f}x{'':>21}"
          f"server CPU per item {1 / row['server_cpu_ratio']:.2f}x", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s of both sides")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--backbone", default="small", choices=("small", "vgg16"), help="bench models to serve")
    parser.add_argument("--rank-calls", type=int, default=200, help="measured calls of each kind per Rank workload")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for CI (no claims)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    duration, rank_calls = (1.0, 5) if args.smoke else (args.duration, args.rank_calls)
    cache_mb = 2 if args.smoke else ServerSettings().embedding_cache_mb  # smoke: a small cache fills quickly
    repo = repository(backbone=args.backbone, smoke=args.smoke)
    vocabulary = Vocabulary.load(repo / "multimodal" / "1" / "vocab.json")
    on = ServerProcess(repo, "--embedding-cache-mb", str(cache_mb), metrics_port=0, start=False)
    off = ServerProcess(repo, "--embedding-cache-mb", "0", metrics_port=0, start=False)
    results: dict[str, Any] = {"machine": machine(), "settings": {"duration_s": duration, "zipf_s": args.zipf,
                               "distinct": DISTINCT, "cache_mb": cache_mb, "backbone": args.backbone}}  # fmt: skip
    rng = np.random.default_rng(0)
    images = [image for image, _ in samples(DISTINCT, seed=7)]
    texts = captions(vocabulary, DISTINCT, seed=7)
    with on, off:
        on.wait_started()
        off.wait_started()
        if "zipf" in parts:
            for concurrency in (1, 32):  # a fresh draw per run; the cache-on server keeps what it learnt
                pairs = [(images[i], texts[j]) for i, j in zip(zipf_indices(DISTINCT, 20_000, args.zipf, rng),
                         zipf_indices(DISTINCT, 20_000, args.zipf, rng), strict=True)]  # fmt: skip
                results[f"zipf c{concurrency}"] = load_runs(on, off, "zipf", pairs, concurrency, duration)
        if "new" in parts:
            # more pairs than either server answers in one run, so none repeats (10 s: ~9k at 1 caller, ~18k at 32)
            n = int(max(1500, 4000 * duration))
            fresh = list(zip([image for image, _ in samples(n, seed=8)], captions(vocabulary, n, seed=8), strict=True))
            results["new c1"] = load_runs(on, off, "new", fresh[: n // 3], 1, duration)
            results["new c32"] = load_runs(on, off, "new", fresh[n // 3 :], 32, duration)
        if "rank" in parts:
            results["rank"] = rank_part(on, off, vocabulary, rank_calls)
        if "memory" in parts:
            results["memory"] = memory_part(on, off, vocabulary, int(cache_mb * 2**20), images[0])
    tags = [] if args.backbone == "small" else [args.backbone]
    print("wrote", write(result_name("fusion_cache", smoke=args.smoke, tags=tags), results))


if __name__ == "__main__":
    main()
