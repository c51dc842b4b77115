"""Scaling: throughput and latency vs batch size, vs concurrent streams, and cost vs text length.

1. ``batch``: the image encoder on a raw onnxruntime session (set up as the server sets up its own),
   batch 1, 2, 4, …, 128, for the ``small`` (64×64) and ``vgg16`` (224×224) backbones. On a slow
   device, batch sizes whose single call exceeds ``--max-call-s`` are skipped (and say so).
2. ``streams``: items/s against the server with 1, 2, 4 and 8 concurrent typed ``ClassifyStream``
   streams (one channel, ``--stream-window`` requests in flight per stream, 8 items per request),
   sent by the project's load generator (``fusionserve.client.loadgen``).
3. ``text``: texts of 1, 5, 20, 50, 100 and 200 words, 32 per batch, through the tokeniser and the
   text encoder. Tokens are padded/truncated to 100; a text encoder that takes each batch cut to its
   longest caption is fed the rows cut, as the server feeds it, so its cost grows with the words up
   to 100; a full-length one's is flat. The tokeniser's grows.

    python bench/scaling.py [--repository REPO] [--vgg16-repository REPO] [--duration 3] [--smoke]
                            [--device cpu|cuda] [--io-binding true|false] [--parts batch,streams,text]

The ``vgg16`` repository is trained (64 samples, 1 epoch) and exported once into bench/results
(about 3 minutes on 2 CPU cores) unless ``--vgg16-repository`` names one; ``--smoke`` skips it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    OrtModel,
    ServerProcess,
    load,
    machine,
    onnx_path,
    percentiles,
    pyplot,
    repository,
    result_name,
    samples,
    save_figure,
    time_calls,
    write,
)

from fusionserve.preprocess import Vocabulary
from fusionserve.repository import load_config, variable_length

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
STREAMS = (1, 2, 4, 8)
STREAM_BATCH = 8
WORDS = (1, 5, 20, 50, 100, 200)
TEXT_BATCH = 32




def bench_batches(model: OrtModel, duration_s: float, max_call_s: float) -> dict[str, dict[str, Any]]:
    """Per batch size: ms per call and items/s of one session, each size warmed up first."""
    shape = model.session.get_inputs()[0].shape
    name = model.session.get_inputs()[0].name
    images = np.random.default_rng(0).random((max(BATCHES), int(shape[1]), int(shape[2]), 3), np.float32)
    out: dict[str, dict[str, Any]] = {}
    for batch in BATCHES:
        feeds = {name: images[:batch]}
        t = time.perf_counter()
        model.run(feeds)  # warm-up: on CUDA each new shape pays a cuDNN algorithm search
        if time.perf_counter() - t > max_call_s:
            out[str(batch)] = {"skipped": f"one call took over --max-call-s {max_call_s:g}s"}
            break
        times = time_calls(lambda feeds=feeds: model.run(feeds), duration_s)
        median = statistics.median(times)
        out[str(batch)] = {"ms_per_call": median * 1000, "items_per_s": batch / median, "calls": len(times),
                           **percentiles(times)}  # fmt: skip
    return out


def bench_text(repo: Path, device: str, threads: int, io_binding: bool, duration_s: float) -> dict[str, Any]:
    """Tokeniser and text-encoder time per batch of ``TEXT_BATCH`` texts, by words per text."""
    text_path = onnx_path(repo, "text_encoder")
    vocab = Vocabulary.load(text_path.parent / "vocab.json")
    encoder = OrtModel(text_path, device=device, threads=threads, io_binding=io_binding)
    cut = variable_length(load_config(repo, "text_encoder", int(text_path.parent.name))) is not None
    words = sorted(vocab.word_index, key=vocab.word_index.get)  # known words: no out-of-vocabulary shortcut
    out: dict[str, Any] = {}
    for n in WORDS:
        texts = [" ".join(words[(i + k) % len(words)] for k in range(n)) for i in range(TEXT_BATCH)]
        tokens = vocab.encode(texts)
        tokens = vocab.cut(tokens) if cut else tokens
        encoder.run({"tokens": tokens})
        tok = statistics.median(time_calls(lambda texts=texts: vocab.encode(texts), duration_s))
        model = statistics.median(time_calls(lambda tokens=tokens: encoder.run({"tokens": tokens}), duration_s))
        out[str(n)] = {
            "tokens_shape": list(tokens.shape),
            "chars_per_text": sum(map(len, texts)) / len(texts),
            "tokenise_us_per_text": tok / TEXT_BATCH * 1e6,
            "model_us_per_text": model / TEXT_BATCH * 1e6,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, help="small-backbone repository (default: the bench's own)")
    parser.add_argument("--vgg16-repository", type=Path, help="vgg16-backbone repository (default: the bench's own)")
    parser.add_argument("--backbones", default="small,vgg16", help="comma-separated (--smoke: small only)")
    parser.add_argument("--parts", default="batch,streams,text", help="comma-separated parts to run")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for CI (no claims)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--io-binding", choices=["true", "false"], default="true", help="on CUDA: raw and server")
    parser.add_argument("--threads", type=int, default=1, help="raw sessions' intra-op threads (server default: 1)")
    parser.add_argument("--max-call-s", type=float, default=2.0, help="skip larger batches past this call time")
    parser.add_argument("--stream-window", type=int, default=1, help="requests in flight per stream")
    parser.add_argument("--cuda-option", action="append", default=[], metavar="KEY=VALUE",
                        help="raw sessions' CUDA option over the server's defaults, e.g. use_tf32=1")  # fmt: skip
    args = parser.parse_args()
    cuda_options = dict(o.split("=", 1) for o in args.cuda_option)
    duration = 0.1 if args.smoke else args.duration
    io_binding = args.io_binding == "true"
    parts = set(args.parts.split(","))
    backbones = args.backbones.split(",")
    notes = []
    if args.smoke and "vgg16" in backbones and args.vgg16_repository is None:
        backbones.remove("vgg16")
        notes.append("--smoke: vgg16 skipped (training + exporting it takes minutes on CPU)")
        print(f"note: {notes[-1]}")
    repos = {b: repository(args.repository if b == "small" else args.vgg16_repository, backbone=b, smoke=args.smoke)
             for b in backbones}  # fmt: skip
    server_args = ("--device", args.device)
    server_env = {"FUSIONSERVE_IO_BINDING": args.io_binding}
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {"duration_s": duration, "device": args.device, "io_binding": io_binding, "threads": args.threads,
                     "max_call_s": args.max_call_s, "stream_window": args.stream_window,
                     "stream_batch": STREAM_BATCH, "text_batch": TEXT_BATCH, "parts": sorted(parts),
                     "repositories": {b: str(r) for b, r in repos.items()}, "server_args": server_args,
                     "server_env": server_env, "cuda_options": cuda_options, "notes": notes},
    }  # fmt: skip

    if "batch" in parts:
        batch = results["batch"] = {}
        for b, repo in repos.items():
            model = OrtModel(onnx_path(repo, "image_encoder"), device=args.device, threads=args.threads,
                             io_binding=io_binding, cuda_options=cuda_options)  # fmt: skip
            results["settings"].setdefault("provider_options", model.provider_options())
            batch[b] = bench_batches(model, duration, args.max_call_s)
            del model
        print(f"image encoder on raw onnxruntime ({args.device}, {args.threads} intra-op thread(s)); "
              "× = items/s relative to batch 1")  # fmt: skip
        print(f"{'batch':>6}" + "".join(f"{f'{b} ms':>13}{'items/s':>10}{'×':>7}" for b in repos))
        for size in BATCHES:
            row = f"{size:>6}"
            for b in repos:
                v = batch[b].get(str(size))
                if v is None or "skipped" in v:
                    row += f"{'skipped' if v else '':>13}{'':>17}"
                    continue
                gain = v["items_per_s"] / batch[b]["1"]["items_per_s"]
                row += f"{v['ms_per_call']:>13.2f}{v['items_per_s']:>10.0f}{gain:>7.2f}"
            print(row)
        skipped = [f"{b} from batch {k}" for b in repos for k, v in batch[b].items() if "skipped" in v]
        if skipped:
            print(f"skipped (a call took over {args.max_call_s:g}s): {', '.join(skipped)}")

    if "streams" in parts:
        items = samples(256)
        streams = results["streams"] = {}
        for b, repo in repos.items():
            with ServerProcess(repo, *server_args, env=server_env, start_timeout_s=300) as server:
                streams[b] = {str(n): load(server.target, items, duration_s=duration, mode="stream", streams=n,
                                           concurrency=n * args.stream_window, batch_size=STREAM_BATCH)
                              for n in STREAMS}  # fmt: skip
        print(f"\nserver, typed ClassifyStream, {STREAM_BATCH} items per request, {args.stream_window} in flight "
              "per stream; × = items/s relative to 1 stream")  # fmt: skip
        print(f"{'streams':>7}" + "".join(f"{f'{b} items/s':>16}{'×':>6}{'p99 ms':>9}" for b in repos))
        for n in STREAMS:
            print(f"{n:>7}" + "".join(
                f"{streams[b][str(n)]['items_per_s']:>16.0f}"
                f"{streams[b][str(n)]['items_per_s'] / streams[b]['1']['items_per_s']:>6.2f}"
                f"{streams[b][str(n)]['p99_ms']:>9.1f}" for b in repos))  # fmt: skip

    if "text" in parts:
        repo = repos.get("small") or next(iter(repos.values()))
        text = results["text"] = bench_text(repo, args.device, args.threads, io_binding, duration)
        first = text[str(WORDS[0])]
        print(f"\ntext length, {TEXT_BATCH} texts per batch (tokens [N, 100], or cut to the longest text); "
              "× = relative to 1 word")
        print(f"{'words':>6}{'chars':>7}{'tokenise µs':>13}{'×':>7}{'model µs':>10}{'×':>7}{'tokeniser share':>17}")
        for n in WORDS:
            v = text[str(n)]
            share = v["tokenise_us_per_text"] / (v["tokenise_us_per_text"] + v["model_us_per_text"])
            print(f"{n:>6}{v['chars_per_text']:>7.0f}{v['tokenise_us_per_text']:>13.1f}"
                  f"{v['tokenise_us_per_text'] / first['tokenise_us_per_text']:>7.1f}{v['model_us_per_text']:>10.1f}"
                  f"{v['model_us_per_text'] / first['model_us_per_text']:>7.2f}{share:>17.0%}")  # fmt: skip

    tags = ["no-iobinding"] if args.device == "cuda" and not io_binding else []
    tags += [f"{k}-{v}" for k, v in cuda_options.items()]
    name = result_name("scaling", smoke=args.smoke, device=args.device, tags=tags)
    plot(results, name, args.device)
    print("wrote", write(name, results))


def plot(results: dict[str, Any], name: str, device: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    if "batch" in results:
        for b, runs in results["batch"].items():
            done = [(int(k), v) for k, v in runs.items() if "skipped" not in v]
            axes[0][0].plot([k for k, _ in done], [v["items_per_s"] for _, v in done], "o-", label=b)
            axes[0][1].plot([k for k, _ in done], [v["ms_per_call"] for _, v in done], "o-", label=b)
        axes[0][0].set(xscale="log", yscale="log", xlabel="batch size", ylabel="items/s",
                       title=f"Image encoder throughput, raw onnxruntime ({device})")  # fmt: skip
        axes[0][1].set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms per call (median)",
                       title="Image encoder latency per call")  # fmt: skip
        for ax in axes[0]:
            ax.set_xticks(BATCHES, [str(b) for b in BATCHES])
            ax.legend()
    if "streams" in results:
        for b, runs in results["streams"].items():
            axes[1][0].plot([int(k) for k in runs], [v["items_per_s"] for v in runs.values()], "o-", label=b)
        axes[1][0].set(xlabel="concurrent streams", ylabel="items/s", ylim=(0, None),
                       title=f"Server, ClassifyStream, {STREAM_BATCH} items per request")  # fmt: skip
        axes[1][0].set_xticks(STREAMS, [str(s) for s in STREAMS])
        axes[1][0].legend()
    if "text" in results:
        words = [int(k) for k in results["text"]]
        tok = [v["tokenise_us_per_text"] for v in results["text"].values()]
        model = [v["model_us_per_text"] for v in results["text"].values()]
        axes[1][1].plot(words, tok, "o-", label="tokeniser")
        axes[1][1].plot(words, model, "o-", label="text encoder (padded to 100 tokens)")
        axes[1][1].set(xlabel="words per text", ylabel="µs per text", ylim=(0, None),
                       title=f"Cost vs text length, batches of {TEXT_BATCH}")  # fmt: skip
        axes[1][1].legend()
    print("wrote", save_figure(fig, name))
    plt.close(fig)


if __name__ == "__main__":
    main()
