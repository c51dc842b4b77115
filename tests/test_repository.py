"""The repository format's contract: configs are validated on load (no TensorFlow needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fusionserve.errors import RepositoryError
from fusionserve.repository import TensorSpec, load_config, variable_length
from tests import tiny_repository


def _edit_config(repo: Path, name: str, edit) -> None:
    path = repo / name / "1" / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.fixture
def repo(repository: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(repository, tmp_path / "repo"))


def test_token_range_is_read_and_written(repo: Path) -> None:
    tokens = load_config(repo, "text_encoder", 1).input("tokens")
    assert tokens is not None and tokens.range == (0, 10_000)
    assert TensorSpec.from_json(tokens.to_json(), "here") == tokens
    assert "range" not in TensorSpec("image", "FP32", (-1, 2)).to_json()


def test_a_config_without_range_takes_its_vocabulary_size(repo: Path) -> None:
    """Repositories exported before ``range`` existed still get their token ids checked."""

    def drop_range(config: dict) -> None:
        del config["inputs"][0]["range"]

    _edit_config(repo, "text_encoder", drop_range)
    vocab = repo / "text_encoder" / "1" / "vocab.json"
    vocab.write_text(json.dumps({**json.loads(vocab.read_text()), "max_words": 7000}))
    assert load_config(repo, "text_encoder", 1).input("tokens").range == (0, 7000)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("value_range", "datatype", "message"),
    [
        ([5, 5], "INT32", r"range must be \[low, high\)"),
        ([0], "INT32", r"range must be \[low, high\)"),
        ([0, 1.5], "INT32", r"range must be \[low, high\)"),
        ([0, True], "INT32", r"range must be \[low, high\)"),
        ("0-10", "INT32", r"range must be \[low, high\)"),
        ([0, 10], "FP32", "range is for integer tensors, not FP32"),
    ],
)
def test_a_malformed_range_names_the_file_and_tensor(repo: Path, value_range, datatype: str, message: str) -> None:
    def edit(config: dict) -> None:
        config["inputs"][0].update(range=value_range, datatype=datatype)

    _edit_config(repo, "text_encoder", edit)
    with pytest.raises(RepositoryError, match=rf"text_encoder/1/config.json: tensor 'tokens': {message}"):
        load_config(repo, "text_encoder", 1, verify_hash=False)


def test_a_config_without_sequence_length_is_full_length(repo: Path) -> None:
    """Every export before the key: the text encoder takes rows of its input's fixed length."""
    config = load_config(repo, "text_encoder", 1)
    assert "sequence_length" not in config.preprocessing and variable_length(config) is None


@pytest.fixture
def dynamic_repo(tmp_path: Path) -> Path:
    return tiny_repository.build(tmp_path / "repo", max_length=12, variable_length=True)


def _dynamic(**changes):
    def edit(config: dict) -> None:
        for key, value in changes.items():
            if key == "shape":
                config["inputs"][0]["shape"] = value
            elif value is None:
                config["preprocessing"].pop(key)
            else:
                config["preprocessing"][key] = value

    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (_dynamic(shape=[-1, 12]), r"one integer input \[-1, -1\] \(has \[\('tokens', \[-1, 12\]\)\]\)"),
    (_dynamic(padding="pre"), "padding 'post', the words first"),
    (_dynamic(max_length=0), "a max_length of at least 1"),
    (_dynamic(pad_value=None), "an integer pad_value"),
    (_dynamic(sequence_length=12), "sequence_length is 12: it must be 'dynamic' or the token input's length"),
    (_dynamic(sequence_length="long"), "sequence_length is 'long'"),
])  # fmt: skip
def test_a_text_encoder_config_that_contradicts_its_sequence_length_is_refused(dynamic_repo: Path, edit,
                                                                             message: str) -> None:  # fmt: skip
    assert variable_length(load_config(dynamic_repo, "text_encoder", 1)) is not None
    _edit_config(dynamic_repo, "text_encoder", edit)
    with pytest.raises(RepositoryError, match=rf"text_encoder/1/config.json: .*{message}"):
        load_config(dynamic_repo, "text_encoder", 1, verify_hash=False)


def test_a_fixed_sequence_length_is_the_token_inputs_length(repo: Path) -> None:
    _edit_config(repo, "text_encoder", lambda c: c["preprocessing"].update(sequence_length=100))
    assert variable_length(load_config(repo, "text_encoder", 1)) is None
