"""``fusionserve import``: a repository from three ONNX files made elsewhere, without TensorFlow.

The graphs are built here with ``onnx.helper`` the way other tools leave them: their own tensor
names, int64 token ids (PyTorch), the fusion model's text input first. With a Keras tokenizer's JSON
and the ``torch`` image declaration, the served answers must equal the graphs run by hand on inputs
prepared by hand; what does not fit is refused, naming what, and leaves the repository as it was.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from fusionserve.cli import main as cli
from fusionserve.errors import ExportError
from fusionserve.export.onnx_import import import_models
from fusionserve.preprocess import ImagePreprocessing, Vocabulary, decode_image
from fusionserve.repository import list_models, list_versions, load_config
from tests import tiny_repository as tiny
from tests.device import ATOL, reference_session
from tests.serving import RunningServer

SIZE, LENGTH, WORDS = (24, 40), 12, 50
NAMES = {"image": "pixel_values", "image_features": "img_emb", "tokens": "input_ids", "text_features": "txt_emb",
         "probabilities": "logits_softmax"}  # fmt: skip
WORD_INDEX = {w: i + 1 for i, w in enumerate("a the red blue green circle square star is of photo".split())}


def keras_tokenizer_json(num_words: int | None = None, oov_token: str | None = None) -> str:
    """What tf_keras' Tokenizer.to_json() writes (its word_index a JSON string inside the JSON)."""
    config = {"num_words": num_words, "filters": '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n', "lower": True,
              "split": " ", "char_level": False, "oov_token": oov_token, "document_count": 4,
              "word_index": json.dumps(WORD_INDEX), "index_word": json.dumps({i: w for w, i in WORD_INDEX.items()})}
    return json.dumps({"class_name": "Tokenizer", "config": config})  # fmt: skip


def graphs(folder: Path, *, batch: int | str = "batch", image_shape=None) -> tuple[Path, Path, Path]:
    """Three ONNX files as another tool leaves them (names, int64 ids, text input first)."""
    rng = np.random.default_rng(7)
    models = {
        "vision.onnx": tiny.image_encoder(rng, *SIZE),
        "language.onnx": tiny.text_encoder(rng, WORDS, LENGTH, TensorProto.INT64),
        "head.onnx": tiny.fusion(rng, 3, text_first=True),
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for file, model in models.items():
        model = tiny._renamed(model, NAMES)
        for value in [*model.graph.input, *model.graph.output]:
            dim = value.type.tensor_type.shape.dim[0]
            dim.ClearField("dim_param") if isinstance(batch, int) else None
            dim.dim_value = batch if isinstance(batch, int) else 0
            if isinstance(batch, str):
                dim.dim_param = batch
        if image_shape and file == "vision.onnx":
            dims = model.graph.input[0].type.tensor_type.shape.dim
            for d, size in zip(dims[1:], image_shape, strict=True):
                d.dim_value = size
        onnx.save(model, str(folder / file))
        paths.append(folder / file)
    return tuple(paths)  # type: ignore[return-value]


def by_hand(paths: tuple[Path, Path, Path], items) -> np.ndarray:
    """torch-mode preprocessing and Keras' Tokenizer (no oov_token: unknown words dropped) written out."""
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    images = np.stack([
        (cv2.cvtColor(cv2.resize(decode_image(i), SIZE[::-1]), cv2.COLOR_BGR2RGB).astype(np.float32) / np.float32(255)
         - mean) / std for i, _ in items])  # fmt: skip
    rows = []
    for _, text in items:
        words = re.sub(r'[!"#$%&()*+,\-./:;<=>?@\[\\\]^_`{|}~\t\n]', " ", text.lower()).split(" ")
        ids = [WORD_INDEX[w] for w in words if w in WORD_INDEX][-LENGTH:]
        rows.append([0] * (LENGTH - len(ids)) + ids)
    look = reference_session(paths[0]).run(None, {"pixel_values": images})[0]
    read = reference_session(paths[1]).run(None, {"input_ids": np.array(rows, np.int64)})[0]
    return reference_session(paths[2]).run(None, {"txt_emb": read, "img_emb": look})[0]


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Path, tuple[Path, Path, Path]]:
    folder = tmp_path_factory.mktemp("import")
    paths = graphs(folder / "onnx")
    (folder / "tokenizer.json").write_text(keras_tokenizer_json(num_words=40))
    (folder / "labels.json").write_text('["cat", "dog", "bird"]')
    repo = folder / "repo"
    argv = ["import", "--image-model", str(paths[0]), "--text-model", str(paths[1]), "--fusion-model", str(paths[2]),
            "--tokenizer", str(folder / "tokenizer.json"), "--image-preprocessing", "torch",
            "--labels", str(folder / "labels.json"), "--positive-label", "dog", "--repository", str(repo)]  # fmt: skip
    assert cli.main(argv) == 0
    return repo, paths


def test_an_imported_repository_serves_what_the_graphs_compute(imported, samples):
    repo, paths = imported
    assert list_models(repo) == ["fusion", "image_encoder", "multimodal", "text_encoder"]
    pipeline = load_config(repo, "multimodal", 1)
    assert pipeline.roles["fusion"]["image_input"] == "img_emb" and pipeline.roles["fusion"]["text_input"] == "txt_emb"
    assert pipeline.roles["fusion"]["positive_label"] == "dog"
    assert load_config(repo, "text_encoder", 1).inputs[0].datatype == "INT64"
    vocab = Vocabulary.load(repo / "multimodal" / "1" / "vocab.json")
    assert vocab.oov_index is None and vocab.max_length == LENGTH
    items = [*samples[:6], (samples[6][0], "an unknown word, then a red star"), (samples[7][0], "")]
    want = by_hand(paths, items)
    from fusionserve.client import FusionClient

    with RunningServer(repo, metrics_port=-1) as srv, FusionClient(srv.target) as client:
        got = client.classify_batch(items[:-1])
        np.testing.assert_allclose([r.probabilities for r in got], want[:-1], atol=ATOL)
        assert [r.label for r in got] == [("cat", "dog", "bird")[i] for i in want[:-1].argmax(1)]
        ranked = client.rank(image=items[0][0], texts=["a red star", "the blue circle"])
        assert ranked[0].score >= ranked[1].score


def test_import_needs_no_tensorflow(imported, tmp_path):
    """The same command in a fresh interpreter where importing TensorFlow, Keras or tf2onnx fails."""
    _, paths = imported
    (tmp_path / "tokenizer.json").write_text(keras_tokenizer_json(oov_token="a"))
    code = ("import sys\nfor m in ('tensorflow', 'keras', 'tf2onnx', 'tf_keras'): sys.modules[m] = None\n"
            "from fusionserve.cli.main import main\nsys.exit(main(sys.argv[1:]))")  # fmt: skip
    argv = ["import", "--image-model", str(paths[0]), "--text-model", str(paths[1]), "--fusion-model",
            str(paths[2]), "--tokenizer", str(tmp_path / "tokenizer.json"), "--repository", str(tmp_path / "repo")]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list_versions(tmp_path / "repo", "multimodal") == [1]
    assert load_config(tmp_path / "repo", "fusion", 1).labels == ("class_0", "class_1", "class_2")


def test_importing_again_adds_version_2(imported, tmp_path):
    repo, paths = imported
    copy = tmp_path / "repo"
    import shutil

    shutil.copytree(repo, copy)
    before = tree(copy)
    vocab = Vocabulary(WORD_INDEX, max_words=40, max_length=LENGTH, oov_index=None, oov_token=None)
    result = import_models(paths, vocab, ImagePreprocessing.mode("torch", *SIZE), copy, labels=["a", "b", "c"])
    assert result.pipeline_version == 2 and [m.version for m in result.models] == [2, 2, 2]
    assert {k: v for k, v in tree(copy).items() if k in before} == before
    assert load_config(copy, "multimodal", 2).steps == {"image_encoder": 2, "text_encoder": 2, "fusion": 2}


def _loop_head(folder: Path) -> Path:
    body = helper.make_graph([helper.make_node("Identity", ["c_in"], ["c_out"]),
                              helper.make_node("Identity", ["x_in"], ["x_out"])], "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("x_in", TensorProto.FLOAT, None)],
                             [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("x_out", TensorProto.FLOAT, None)])  # fmt: skip
    nodes = [helper.make_node("Concat", ["img_emb", "txt_emb"], ["joined"], axis=1),
             helper.make_node("Loop", ["", "cond"], ["out"], body=body, name="my_loop")]  # fmt: skip
    nodes[1].input.append("joined")
    graph = helper.make_graph(nodes, "head", [
        helper.make_tensor_value_info("img_emb", TensorProto.FLOAT, ["batch", tiny.FEATURES]),
        helper.make_tensor_value_info("txt_emb", TensorProto.FLOAT, ["batch", tiny.FEATURES])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 2 * tiny.FEATURES])],
        [helper.make_tensor("cond", TensorProto.BOOL, [], [False])])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(folder / "loop.onnx"))
    return folder / "loop.onnx"


REFUSED = {
    "fixed batch axis": (lambda tmp: graphs(tmp / "fixed", batch=1), {}, r"must be a dynamic batch axis"),
    "channels first": (lambda tmp: graphs(tmp / "nchw", image_shape=(3, 24, 40)), {},
                       r"image model input 'pixel_values' must be FP32 \[N, H, W, 3\].*channels first"),
    "a loop in the fusion graph": (lambda tmp: (*graphs(tmp / "g")[:2], _loop_head(tmp)), {},
                                   r"fusion: graph holds control-flow ops \['Loop'\] \(nodes \['my_loop'\]\)"),
    "tokenizer longer than the text model": (lambda tmp: graphs(tmp / "g"), {"max_length": LENGTH + 1},
                                             r"the tokenizer pads to 13 tokens, the text model takes 12"),
    "ids beyond the embedding": (lambda tmp: graphs(tmp / "g"), {"max_words": WORDS + 5},
                                 r"text_encoder: the trial run failed"),
    "labels for a features head": (lambda tmp: graphs(tmp / "g"), {"labels": ["a", "b", "c"], "kind": "features"},
                                   r"outputs features has no classes"),
    "too few labels": (lambda tmp: graphs(tmp / "g"), {"labels": ["a", "b"]}, r"2 labels given but .* 3 outputs"),
}  # fmt: skip


@pytest.mark.parametrize(("make", "change", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_what_does_not_fit_is_refused_and_changes_nothing(imported, tmp_path, make, change, message):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(imported[0], repo)
    before = tree(repo)
    vocab = Vocabulary(WORD_INDEX, max_words=change.get("max_words", 40), max_length=change.get("max_length", LENGTH),
                       oov_index=None, oov_token=None)  # fmt: skip
    with pytest.raises(ExportError, match=message):
        import_models(make(tmp_path), vocab, ImagePreprocessing.mode("torch", *SIZE), repo,
                      labels=change.get("labels"), fusion_outputs=change.get("kind"))  # fmt: skip
    assert tree(repo) == before and not list(repo.glob(".staging-*"))


def test_cli_names_a_tokenizer_it_cannot_read(tmp_path, capsys):
    paths = graphs(tmp_path / "g")
    (tmp_path / "tok.json").write_text('{"class_name": "Tokenizer", "config": {"oov_token": "zz", "word_index": "{}"}}')
    argv = ["import", "--image-model", str(paths[0]), "--text-model", str(paths[1]), "--fusion-model", str(paths[2]),
            "--tokenizer", str(tmp_path / "tok.json"), "--repository", str(tmp_path / "repo")]  # fmt: skip
    assert cli.main(argv) == 2
    assert "oov_token 'zz' has no index" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists() or not list_models(tmp_path / "repo")
