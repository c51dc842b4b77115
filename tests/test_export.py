"""Real exports with TensorFlow, tf2onnx and onnxruntime: repository layout, parity, gates, errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from fusionserve import data as gen
from fusionserve.cli import main as cli
from fusionserve.errors import ExportError
from fusionserve.export import convert
from fusionserve.export.gate import ALLOWED_OPS
from fusionserve.preprocess import ImagePreprocessing, Vocabulary
from fusionserve.repository import (
    ONNX_TYPES,
    PIPELINE_NAME,
    PLATFORM_ONNX,
    PLATFORM_PIPELINE,
    TensorSpec,
    list_models,
    list_versions,
    load_config,
)

MODELS = ("image_encoder", "text_encoder", "fusion")
EXPECTED_IO = {
    "image_encoder": (
        [TensorSpec("image", "FP32", (-1, 64, 64, 3))],
        [TensorSpec("image_features", "FP32", (-1, 64))],
    ),
    "text_encoder": (
        [TensorSpec("tokens", "INT32", (-1, -1), (0, 10_000))],  # each batch cut to its longest caption
        [TensorSpec("text_features", "FP32", (-1, 64))],
    ),
    "fusion": (
        [TensorSpec("image_features", "FP32", (-1, 64)), TensorSpec("text_features", "FP32", (-1, 64))],
        [TensorSpec("probabilities", "FP32", (-1, 2))],
    ),
}
TOLERANCE = 1e-4
pytestmark = pytest.mark.tf  # every test here exports with TensorFlow or checks what an export wrote
# Tests that use the session's trained models (about 15 s of training, paid once) or export again.
slow = pytest.mark.slow
HELD_OUT = 71  # > 64, and 71 = 10 * 7 + 1 so batches of 7 end with a batch of 1


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (hidden ones included), by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_no_staging(repo: Path) -> None:
    assert not list(repo.glob(".staging-*")), sorted(p.name for p in repo.iterdir())


def copy_repository(repository: Path, dest: Path) -> Path:
    shutil.copytree(repository, dest)
    return dest


@pytest.fixture(scope="module")
def repository(trained_repository: Path) -> Path:
    """Here ``repository`` is the one exported from the trained Keras models, not the tiny one."""
    return trained_repository


@pytest.fixture(scope="module")
def keras_models(trained_dir: Path) -> dict:
    import keras

    return {name: keras.models.load_model(trained_dir / f"{name}.keras", compile=False) for name in MODELS}


@pytest.fixture(scope="module")
def held_out(repository: Path) -> dict[str, np.ndarray]:
    """Held-out samples preprocessed as the server will, from the repository's own settings."""
    image_config = load_config(repository, "image_encoder", 1)
    vocab = Vocabulary.load(repository / PIPELINE_NAME / "1" / "vocab.json")
    size = (image_config.preprocessing["height"], image_config.preprocessing["width"])
    images, tokens = convert.parity_inputs(ImagePreprocessing(*size), vocab, HELD_OUT)
    return {"image": images, "tokens": tokens}


def run_in_batches(session: ort.InferenceSession, inputs: dict[str, np.ndarray], batch: int) -> np.ndarray:
    n = len(next(iter(inputs.values())))
    parts = [session.run(None, {k: v[i : i + batch] for k, v in inputs.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(parts)


def session(repository: Path, name: str, version: int = 1) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(repository / name / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )


# ------------------------------------------------------------------------------ repository layout


@slow
def test_repository_layout(repository: Path) -> None:
    assert list_models(repository) == sorted([*MODELS, PIPELINE_NAME])
    for name in MODELS:
        assert list_versions(repository, name) == [1]
        assert (repository / name / "1" / "model.onnx").is_file()
        assert (repository / name / "1" / "config.json").is_file()
    assert {p.name for p in (repository / PIPELINE_NAME / "1").iterdir()} == {
        "config.json",
        "vocab.json",
        "labels.json",
    }
    assert_no_staging(repository)


@slow
@pytest.mark.parametrize("name", MODELS)
def test_model_configs(repository: Path, name: str) -> None:
    import keras
    import tensorflow as tf
    import tf2onnx

    config = load_config(repository, name, 1)  # validates the schema and the file's sha256
    path = repository / name / "1" / "model.onnx"
    assert config.name == name and config.version == 1 and config.platform == PLATFORM_ONNX
    assert config.model_file == "model.onnx"
    assert config.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    inputs, outputs = EXPECTED_IO[name]
    assert list(config.inputs) == inputs and list(config.outputs) == outputs
    assert config.max_batch_size >= 1
    proto = onnx.load(str(path))
    assert config.opset == convert.DEFAULT_OPSET
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {config.opset}
    assert config.versions["tensorflow"] == tf.__version__
    assert config.versions["keras"] == keras.__version__
    assert config.versions["tf2onnx"] == tf2onnx.__version__
    assert config.versions["onnx"] == onnx.__version__
    assert config.versions["onnxruntime"] == ort.__version__
    assert 0 <= config.parity["max_abs_diff"] <= TOLERANCE
    assert config.parity["tolerance"] == TOLERANCE
    assert config.parity["samples"] >= 64
    assert config.extra["ops"] == sorted({n.op_type for n in proto.graph.node})
    # Loading loses nothing that was written.
    assert config.to_json() == json.loads((path.parent / "config.json").read_text(encoding="utf-8"))
    if name == "image_encoder":
        pre = config.preprocessing
        assert (pre["type"], pre["height"], pre["width"], pre["channels"]) == ("image", 64, 64, 3)
        assert (pre["color_order"], pre["interpolation"]) == ("BGR", "INTER_LINEAR")
    elif name == "text_encoder":
        pre = config.preprocessing
        assert (pre["type"], pre["max_length"], pre["padding"], pre["truncating"], pre["pad_value"]) == (
            "text",
            100,
            "post",
            "post",
            0,
        )
        assert pre["sequence_length"] == "dynamic"
        length = config.parity["sequence_length"]
        assert length["dynamic"] is True and length["max_abs_diff"] <= length["tolerance"] and length["rows"] >= 202
        assert config.vocabulary_file == pre["vocabulary_file"] == "vocab.json"
        assert Vocabulary.load(repository / name / "1" / "vocab.json").max_length == 100
    else:
        assert config.labels == gen.LABELS


@slow
def test_onnx_io_matches_config(repository: Path) -> None:
    for name in MODELS:
        config = load_config(repository, name, 1)
        sess = session(repository, name)
        for specs, args in ((config.inputs, sess.get_inputs()), (config.outputs, sess.get_outputs())):
            assert [a.name for a in args] == [t.name for t in specs]
            for arg, spec in zip(args, specs, strict=True):
                assert ONNX_TYPES[arg.type] == spec.datatype
                assert isinstance(arg.shape[0], str), f"{name}.{arg.name}: batch axis is not dynamic"
                assert [-1 if isinstance(d, str) else d for d in arg.shape[1:]] == list(spec.shape[1:])


@slow
def test_pipeline_config(repository: Path, trained_dir: Path) -> None:
    config = load_config(repository, PIPELINE_NAME, 1)
    assert config.platform == PLATFORM_PIPELINE
    assert config.steps == {name: 1 for name in MODELS}
    assert config.labels == gen.LABELS
    assert [(t.name, t.datatype) for t in config.inputs] == [("IMAGE", "BYTES"), ("TEXT", "BYTES")]
    assert [(t.name, t.datatype) for t in config.outputs] == [("PROBABILITIES", "FP32"), ("LABEL", "BYTES")]
    assert config.preprocessing["image"] == load_config(repository, "image_encoder", 1).preprocessing
    assert config.preprocessing["text"] == load_config(repository, "text_encoder", 1).preprocessing
    vdir = repository / PIPELINE_NAME / "1"
    assert config.to_json() == json.loads((vdir / "config.json").read_text(encoding="utf-8"))
    assert Vocabulary.load(vdir / config.vocabulary_file) == Vocabulary.load(trained_dir / "vocab.json")
    assert json.loads((vdir / "labels.json").read_text()) == list(gen.LABELS)


# ------------------------------------------------------------------------------------------- parity


@slow
@pytest.mark.parametrize("batch", [HELD_OUT, 7, 1])
def test_onnx_matches_keras(repository: Path, keras_models: dict, held_out: dict, batch: int) -> None:
    image_features = np.asarray(keras_models["image_encoder"](held_out["image"]))
    text_features = np.asarray(keras_models["text_encoder"](held_out["tokens"]))
    cases = {
        "image_encoder": ({"image": held_out["image"]}, image_features),
        "text_encoder": ({"tokens": held_out["tokens"]}, text_features),
        "fusion": (
            {"image_features": image_features, "text_features": text_features},
            np.asarray(keras_models["fusion"]([image_features, text_features])),
        ),
    }
    for name, (inputs, expected) in cases.items():
        got = run_in_batches(session(repository, name), inputs, batch)
        assert got.shape == expected.shape == (HELD_OUT, expected.shape[1]), name
        diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
        assert diff <= TOLERANCE, f"{name}, batch {batch}: max abs diff {diff:.3g}"


@slow
def test_onnx_chain_matches_keras_chain(repository: Path, keras_models: dict, held_out: dict) -> None:
    image_features = session(repository, "image_encoder").run(None, {"image": held_out["image"]})[0]
    text_features = session(repository, "text_encoder").run(None, {"tokens": held_out["tokens"]})[0]
    onnx_probs = session(repository, "fusion").run(
        None, {"image_features": image_features, "text_features": text_features}
    )[0]
    keras_probs = np.asarray(
        keras_models["fusion"](
            [
                keras_models["image_encoder"](held_out["image"]),
                keras_models["text_encoder"](held_out["tokens"]),
            ]
        )
    )
    assert np.max(np.abs(onnx_probs - keras_probs)) <= TOLERANCE
    np.testing.assert_allclose(onnx_probs.sum(1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------- gates


def _ops(graph: onnx.GraphProto) -> list[str]:
    """Op types in a graph and every subgraph inside it."""
    found = []
    for node in graph.node:
        found.append(node.op_type)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                found += _ops(sub)
    return found


@slow
def test_text_encoder_is_one_lstm_without_loops(repository: Path) -> None:
    ops = _ops(onnx.load(str(repository / "text_encoder" / "1" / "model.onnx")).graph)
    assert ops.count("LSTM") == 1
    assert not {"Loop", "Scan", "If"} & set(ops)


@slow
@pytest.mark.parametrize("name", MODELS)
def test_exported_graphs_pass_the_gate(repository: Path, name: str) -> None:
    proto = onnx.load(str(repository / name / "1" / "model.onnx"))
    assert set(_ops(proto.graph)) <= ALLOWED_OPS
    assert convert.gate(proto, name) == tuple(sorted(set(_ops(proto.graph))))


def _tiny_model(node: onnx.NodeProto, inputs: list, outputs: list, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph([node], "tiny", inputs, outputs, initializer=list(initializers))
    # IR version 10 (onnx 1.16): what the onnxruntime releases we support all read.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def _loop_model() -> onnx.ModelProto:
    """y = x + 1, three times, as an ONNX Loop."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["x_in", "one"], ["x_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1]),
        ],
        initializer=[helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    return _tiny_model(
        helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body),
        [
            helper.make_tensor_value_info("trips", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )


def _unary_model(op: str) -> onnx.ModelProto:
    return _tiny_model(
        helper.make_node(op, ["x"], ["y"]),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )


def test_gate_rejects_loop() -> None:
    model = _loop_model()
    # The graph is real: onnxruntime runs it.
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"trips": np.array(3, np.int64), "cond": np.array(True), "x": np.zeros(1, np.float32)})
    assert out[0].tolist() == [3.0]
    with pytest.raises(ExportError, match=r"looper: .*control-flow.*Loop"):
        convert.gate(model, "looper")


@pytest.mark.parametrize("op", ["Softplus", "Elu", "HardSigmoid"])
def test_gate_rejects_ops_outside_allow_list(op: str) -> None:
    assert op not in ALLOWED_OPS
    with pytest.raises(ExportError, match=rf"odd_model: .*allow-list.*{op}"):
        convert.gate(_unary_model(op), "odd_model")


def test_gate_accepts_allowed_ops() -> None:
    assert convert.gate(_unary_model("Relu"), "fine") == ("Relu",)


# ---------------------------------------------------------------------------------- failed exports


@slow
def test_parity_failure_names_the_model_and_changes_nothing(
    repository: Path, trained_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = copy_repository(repository, tmp_path / "repo")
    before = tree_hashes(repo)
    # A negative tolerance no difference can meet: the check itself must stop the export.
    monkeypatch.setattr(convert, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(ExportError, match=r"image_encoder: onnxruntime differs from Keras .* tolerance"):
        convert.export_from_dir(trained_dir, repo)
    assert tree_hashes(repo) == before
    assert all(list_versions(repo, name) == [1] for name in [*MODELS, PIPELINE_NAME])
    assert_no_staging(repo)


def _save(model, path: Path) -> Path:
    model.save(path)
    return path


def _fusion(image_dim: int, text_dim: int, activation: str | None = None):
    import keras
    from keras import layers

    a, b = keras.Input((image_dim,), name="image_features"), keras.Input((text_dim,), name="text_features")
    x = layers.Concatenate()([a, b])
    if activation:
        x = layers.Dense(8, activation=activation)(x)
    return keras.Model([a, b], layers.Dense(2, activation="softmax")(x))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _vocab_file(tmp_path: Path, data) -> Path:
    return _write(tmp_path / "bad_vocab.json", data if isinstance(data, str) else json.dumps(data))


# Each case: (change the valid arguments, a regex the ExportError must match).
ERROR_CASES = {
    "missing model file": (
        lambda a, tmp: a.update(image=tmp / "missing.keras"),
        r"image model .*missing\.keras.* does not exist",
    ),
    "not a keras file": (
        lambda a, tmp: a.update(text=_write(tmp / "x.keras", "hello")),
        r"text model .*x\.keras.* is not a Keras model file",
    ),
    "model in the wrong role": (
        lambda a, tmp: a.update(image=a["fusion"]),
        r"image model must have 1 input\(s\) and 1 output, has 2",
    ),
    "fusion inputs do not match the encoders": (
        lambda a, tmp: a.update(fusion=_save(_fusion(32, 64), tmp / "fusion32.keras")),
        r"fusion model inputs do not match the encoders' outputs",
    ),
    "fusion graph with an op outside the allow-list": (
        # Fails at the last model, after both encoders were converted and staged.
        lambda a, tmp: a.update(fusion=_save(_fusion(64, 64, "softplus"), tmp / "softplus.keras")),
        r"fusion: graph holds ops outside the CUDA-provider allow-list: \['Softplus'\]",
    ),
    "repository is a file": (
        lambda a, tmp: a.update(repository=_write(tmp / "file", "x")),
        r"repository .*file.* is a file, not a folder",
    ),
    "repository below a file": (
        lambda a, tmp: a.update(repository=_write(tmp / "file", "x") / "repo"),
        r"cannot write to repository",
    ),
    "vocabulary missing": (
        lambda a, tmp: a.update(vocab_file=tmp / "nope.json"),
        r"tokenizer .*nope\.json.* does not exist",
    ),
    "vocabulary not json": (
        lambda a, tmp: a.update(vocab_file=_vocab_file(tmp, "{oops")),
        r"tokenizer .* is not readable JSON",
    ),
    "vocabulary indices out of range": (
        lambda a, tmp: a.update(
            vocab_file=_vocab_file(tmp, {"word_index": {"a": 0}, "max_words": 9, "max_length": 100})
        ),
        r"tokenizer .* is neither a Keras Tokenizer's to_json\(\) nor a valid fusionserve vocabulary JSON.*\[1, 9\)",
    ),
    "vocabulary max_length differs from the text model": (
        lambda a, tmp: a.update(vocab_file=_vocab_file(tmp, {"word_index": {}, "max_words": 9, "max_length": 50})),
        r"text model input must be \[N, 50\]",
    ),
    "labels do not match the classes": (
        lambda a, tmp: a.update(labels_file=_write(tmp / "labels.json", '["a", "b", "c"]')),
        r"3 labels given but the fusion model has 2 outputs",
    ),
}


@slow
@pytest.mark.parametrize("case", ERROR_CASES.keys())
def test_export_errors(case: str, repository: Path, trained_dir: Path, tmp_path: Path) -> None:
    repo = copy_repository(repository, tmp_path / "repo")
    before = tree_hashes(repo)
    args = {
        "image": trained_dir / "image_encoder.keras",
        "text": trained_dir / "text_encoder.keras",
        "fusion": trained_dir / "fusion.keras",
        "vocab_file": trained_dir / "vocab.json",
        "repository": repo,
    }
    change, message = ERROR_CASES[case]
    change(args, tmp_path)
    with pytest.raises(ExportError, match=message):
        convert.export_files(**args)
    assert tree_hashes(repo) == before, "the repository changed"
    assert_no_staging(repo)
    if args["repository"] != repo:
        target = args["repository"]
        assert not target.exists() or (target.is_file() and target.read_text() == "x")


@slow
def test_unwritable_repository(repository: Path, trained_dir: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores permission bits, so chmod cannot make a folder unwritable for it; the same
        # error path is covered by "repository below a file" in test_export_errors.
        pytest.skip("running as root: permission bits do not stop root from writing")
    repo = copy_repository(repository, tmp_path / "repo")
    before = tree_hashes(repo)
    repo.chmod(0o500)
    try:
        with pytest.raises(ExportError, match="cannot write to repository"):
            convert.export_from_dir(trained_dir, repo)
    finally:
        repo.chmod(0o700)
    assert tree_hashes(repo) == before
    assert_no_staging(repo)


# ------------------------------------------------------------------------- versions and user models


@slow
def test_export_again_adds_version_2_and_keeps_version_1(repository: Path, trained_dir: Path, tmp_path: Path) -> None:
    repo = copy_repository(repository, tmp_path / "repo")
    before = tree_hashes(repo)
    result = convert.export_from_dir(trained_dir, repo)
    assert [(m.name, m.version) for m in result.models] == [(name, 2) for name in MODELS]
    assert result.pipeline_version == 2
    for name in [*MODELS, PIPELINE_NAME]:
        assert list_versions(repo, name) == [1, 2]
        assert load_config(repo, name, 2).version == 2
    assert load_config(repo, PIPELINE_NAME, 2).steps == {name: 2 for name in MODELS}
    after = tree_hashes(repo)
    assert {k: v for k, v in after.items() if k in before} == before, "version 1 changed"
    assert set(before) < set(after)
    assert_no_staging(repo)


@slow
def test_export_user_model_files(trained_dir: Path, tmp_path: Path) -> None:
    # Users' own files, under their own names and outside a 'fusionserve train' folder.
    mine = tmp_path / "mine"
    mine.mkdir()
    for src, dst in (
        ("image_encoder.keras", "my_image.keras"),
        ("text_encoder.keras", "my_text.keras"),
        ("fusion.keras", "my_fusion.keras"),
        ("vocab.json", "my_vocab.json"),
    ):
        shutil.copy(trained_dir / src, mine / dst)
    repo = tmp_path / "new" / "repo"
    result = convert.export_files(
        mine / "my_image.keras",
        mine / "my_text.keras",
        mine / "my_fusion.keras",
        mine / "my_vocab.json",
        repo,
    )
    assert result.repository == repo and result.pipeline_version == 1
    assert all(m.version == 1 and m.max_abs_diff <= TOLERANCE for m in result.models)
    assert list_models(repo) == sorted([*MODELS, PIPELINE_NAME])
    fusion = load_config(repo, "fusion", 1)
    assert fusion.labels == gen.LABELS  # two classes and no labels file: the generator's labels
    assert fusion.extra["source"]["fusion_model"] == str(mine / "my_fusion.keras")
    assert_no_staging(repo)


# ---------------------------------------------------------------------------------------------- CLI


@slow
def test_cli_export(trained_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    assert cli.main(["export", "--from", str(trained_dir), "--repository", str(repo)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["model", "version"]
    for name in MODELS:
        row = next(line for line in lines if line.startswith(name + " "))
        assert row.split()[1] == "1"
        assert float(row.split()[2]) <= TOLERANCE
    assert any(line.startswith("multimodal") and str(repo) in line for line in lines)
    assert list_models(repo) == sorted([*MODELS, PIPELINE_NAME])


def test_cli_export_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "not-there"
    assert cli.main(["export", "--from", str(missing), "--repository", str(tmp_path / "repo")]) == 2
    captured = capsys.readouterr()
    assert "error" in captured.err and str(missing) in captured.err
    assert captured.out == ""
    assert not (tmp_path / "repo").exists()


@slow
def test_cli_train_prints_our_lines_and_none_of_tensorflows(tmp_path: Path) -> None:
    """No C++ start-up lines, cuInit error or tf.function retracing warning between our own lines."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a newcomer's shell has it
    done = subprocess.run(
        [sys.executable, "-m", "fusionserve", "train", "--out", str(tmp_path / "t"), "--samples", "300",
         "--epochs", "1"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    for noise in ("absl::InitializeLog", "cudart_stub", "cuInit", "retracing", "oneDNN", "cpu_feature_guard"):
        assert noise not in output, f"{noise!r} in:\n{output[-3000:]}"
    assert "training the image-only probe" in output and '"fused_test_accuracy"' in done.stdout
