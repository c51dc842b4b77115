"""The repository format's contract: configs are validated on load (no TensorFlow needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fusionserve.errors import RepositoryError
from fusionserve.repository import TensorSpec, load_config


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
