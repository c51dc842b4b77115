"""Text pays for words: the text encoder cut to each batch's longest caption, against the graph exported before.

The bench repository's text encoder (``Embedding(mask_zero=True) → LSTM → Dense``, exported so that
each batch is cut to its longest caption: ``sequence_lens`` from the tokens, ``"sequence_length":
"dynamic"``) is served as exported ("after"), and from a copy ("before") whose text encoder is the
graph every export made before: the same LSTM and weights run over all 100 padded steps, without
``sequence_lens``, fed full-length rows (its answers read the padding: this copy is for timing only).
Measured in one run, taking turns:

- ``encoder``: the text encoder alone (onnxruntime, one intra-op thread as the server), 32 captions
  per call: before (100 steps); after, fed full-length rows (its LSTM stops at the longest caption);
  after, fed rows cut to the longest caption (what the server sends). p50 of calls taking turns.
- ``rank``: ``Rank`` of one image against 32 captions vs ``Classify`` of the same 32 pairs in one
  call and 32 one-item calls, one caller, cache off (bench/fusion_cache.py's ``rank_vs_classify``),
  on a server over each repository.

    python bench/text_length.py [--calls 200] [--encoder-calls 2000] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, OrtModel, ServerProcess, machine, repository, result_name, samples, write
from fusion_cache import CANDIDATES, captions, rank_vs_classify

from fusionserve.preprocess import Vocabulary
from fusionserve.repository import CONFIG_FILE, MODEL_FILE, load_config, sha256_file, variable_length, version_dir


def before_copy(repo: Path, dest: Path) -> Path:
    """``repo`` with its text encoder as every export made it before: the LSTM over all padded steps.

    The LSTM's ``sequence_lens`` input and the nodes that count it go; the config says the fixed
    length again (``"sequence_length": max_length``, tokens ``[-1, max_length]``), the pipeline's too.
    """
    import onnx

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(repo, dest)
    pipeline = load_config(dest, "multimodal", 1)
    version = pipeline.steps["text_encoder"]
    folder = version_dir(dest, "text_encoder", version)
    config = load_config(dest, "text_encoder", version)
    length = variable_length(config)
    if length is None:
        raise SystemExit(f"{repo}: its text encoder is not cut to each batch's longest caption; nothing to compare")
    model = onnx.load(str(folder / MODEL_FILE))
    graph = model.graph
    lstm = next(n for n in graph.node if n.op_type == "LSTM")
    lstm.input[4] = ""
    while True:  # the length-counting nodes and their constants, now unread
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in read for o in n.output if o)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(tensor)
    graph.input[0].type.tensor_type.shape.dim[1].dim_value = length.max_length
    onnx.save(model, str(folder / MODEL_FILE))
    data = json.loads((folder / CONFIG_FILE).read_text())
    data["inputs"][0]["shape"] = [-1, length.max_length]
    data["preprocessing"]["sequence_length"] = length.max_length
    data["sha256"] = sha256_file(folder / MODEL_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(data, indent=2))
    pipeline_file = version_dir(dest, "multimodal", 1) / CONFIG_FILE
    data = json.loads(pipeline_file.read_text())
    data["preprocessing"]["text"]["sequence_length"] = length.max_length
    pipeline_file.write_text(json.dumps(data, indent=2))
    return dest


def encoder_part(after: Path, before: Path, vocabulary: Vocabulary, calls: int) -> dict[str, Any]:
    """The text encoder alone on 32 captions: before, after at full length, after cut; calls taking turns."""
    models = {name: OrtModel(version_dir(repo, "text_encoder", 1) / MODEL_FILE) for name, repo in
              (("before", before), ("after", after))}  # fmt: skip
    texts = captions(vocabulary, CANDIDATES, seed=10)
    full = vocabulary.encode(texts)
    cut = vocabulary.cut(full)
    kinds = {"before, 100 steps": (models["before"], full), "after, full-length rows": (models["after"], full),
             "after, cut to the longest": (models["after"], cut)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in kinds}
    warm = max(1, calls // 20)
    for k in range(calls + warm):
        for name, (model, tokens) in kinds.items():
            started = time.perf_counter()
            model.run({"tokens": tokens})
            if k >= warm:
                times[name].append(time.perf_counter() - started)
    p50 = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    first = p50["before, 100 steps"]
    print(f"\ntext encoder, {CANDIDATES} captions ({int((full != 0).sum(1).min())}-{cut.shape[1]} tokens) per call, "
          f"p50 of {calls} calls each, taking turns:")  # fmt: skip
    for name, value in p50.items():
        print(f"  {name:<28}{value:>8.3f} ms {first / value:>6.2f}x")
    return {"tokens": {"full": list(full.shape), "cut": list(cut.shape)}, "p50_ms": p50,
            "speedup_cut_vs_before": first / p50["after, cut to the longest"],
            "speedup_cut_vs_full_rows": p50["after, full-length rows"] / p50["after, cut to the longest"]}  # fmt: skip


def rank_part(after: Path, before: Path, vocabulary: Vocabulary, calls: int) -> dict[str, Any]:
    """Rank vs Classify (cache off) on a server over each repository, the same image and captions."""
    out: dict[str, Any] = {}
    image, texts = samples(1, seed=11)[0][0], [captions(vocabulary, CANDIDATES, seed=10)]
    for name, repo in (("before", before), ("after", after)):
        with ServerProcess(repo, "--embedding-cache-mb", "0", metrics_port=0) as server:
            server.wait_started()
            out[name] = rank_vs_classify(server.target, [image], texts, calls)
    print(f"\nRank of 1 image against {CANDIDATES} captions, one caller, cache off (p50 ms):")
    print(f"  {'':<8}{'Rank':>8}{'Classify 32':>13}{'32 calls':>10}{'vs Classify':>13}{'vs 32 calls':>13}")
    for name, r in out.items():
        print(f"  {name:<8}{r['rank_p50_ms']:>8.2f}{r['classify_p50_ms']:>13.2f}{r['one_by_one_p50_ms']:>10.2f}"
              f"{r['vs_classify']:>12.1f}x{r['vs_one_by_one']:>12.1f}x")  # fmt: skip
    out["rank_speedup"] = out["before"]["rank_p50_ms"] / out["after"]["rank_p50_ms"]
    print(f"  Rank after ÷ before: {1 / out['rank_speedup']:.2f}x the time")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="measured calls of each kind per Rank workload")
    parser.add_argument("--encoder-calls", type=int, default=2000, help="measured text-encoder calls of each kind")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for CI (no claims)")
    args = parser.parse_args()
    calls, encoder_calls = (5, 50) if args.smoke else (args.calls, args.encoder_calls)
    after = repository(smoke=args.smoke)
    before = before_copy(after, RESULTS / f"{after.name}-before-text-length")
    vocabulary = Vocabulary.load(after / "multimodal" / "1" / "vocab.json")
    settings = {"calls": calls, "encoder_calls": encoder_calls, "candidates": CANDIDATES, "cache": "off"}
    results: dict[str, Any] = {"machine": machine(), "settings": settings}
    results["encoder"] = encoder_part(after, before, vocabulary, encoder_calls)
    results["rank"] = rank_part(after, before, vocabulary, calls)
    print("wrote", write(result_name("text_length", smoke=args.smoke), results))


if __name__ == "__main__":
    main()
