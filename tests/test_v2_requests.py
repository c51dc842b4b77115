"""A pipeline's V2 request read straight from the wire in its common form, and generally otherwise.

``pipeline_items`` reads the common form (both inputs raw BYTES, one element per row) directly, at a
fraction of the cost of decoding every tensor; any other request goes the general way, which also
says what is wrong with a bad one. Whichever way a request goes, the answer must be the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from fusionserve.errors import FusionServeError
from fusionserve.server.v2_requests import _decoded_items, _raw_items, pipeline_items
from fusionserve.v2 import grpc_service_pb2 as pb
from fusionserve.v2_codec import serialize_bytes

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))  # not decoded here: any bytes do
CAPTIONS = ["a red circle", "two blue squares", "ünïcode wörds"]


def _tensor(request: pb.ModelInferRequest, name: str, shape: list[int], values: list[Any], *,
            raw: bool = True, datatype: str = "BYTES", **parameters: str) -> None:  # fmt: skip
    encoded = [v.encode() if isinstance(v, str) else v for v in values]
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    for key, value in parameters.items():
        tensor.parameters[key].string_param = value
    if raw:
        request.raw_input_contents.append(serialize_bytes(encoded))
    else:
        tensor.contents.bytes_contents.extend(encoded)


def _pair(n: int = 2, *, image_shape: list[int] | None = None, text_shape: list[int] | None = None,
          text_first: bool = False, **text: Any) -> pb.ModelInferRequest:  # fmt: skip
    request = pb.ModelInferRequest(model_name="multimodal")
    image = ("IMAGE", image_shape or [n, 1], [PNG] * n)
    caption = ("TEXT", text_shape or [n, 1], (CAPTIONS * n)[:n])
    for name, shape, values in (caption, image) if text_first else (image, caption):
        _tensor(request, name, shape, values, **(text if name == "TEXT" else {}))
    return request


def _short_of_one() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="multimodal")
    _tensor(request, "IMAGE", [3, 1], [PNG] * 2)
    _tensor(request, "TEXT", [3, 1], CAPTIONS)
    return request


def _typed() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="multimodal")
    _tensor(request, "IMAGE", [2, 1], [PNG] * 2, raw=False)
    _tensor(request, "TEXT", [2, 1], CAPTIONS[:2], raw=False)
    return request


def _bad_utf8() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="multimodal")
    _tensor(request, "IMAGE", [1, 1], [PNG])
    _tensor(request, "TEXT", [1, 1], [b"\xff\xfe not text"])
    return request


def _truncated() -> pb.ModelInferRequest:
    request = _pair(1)
    request.raw_input_contents[1] = b"\x40\x00"  # two bytes of a four-byte length prefix
    return request


def _mixed_batches() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="multimodal")
    _tensor(request, "IMAGE", [2, 1], [PNG] * 2)
    _tensor(request, "TEXT", [1, 1], CAPTIONS[:1])
    return request


def _extra_input() -> pb.ModelInferRequest:
    request = _pair(1)
    _tensor(request, "EXTRA", [1, 1], ["x"])
    return request


def _raw_and_typed() -> pb.ModelInferRequest:
    request = _pair(1)
    request.inputs[1].contents.bytes_contents.append(b"also typed")
    return request


# Requests in the common form: read directly.
COMMON: dict[str, Callable[[], pb.ModelInferRequest]] = {
    "[N, 1] each": lambda: _pair(3),
    "[N] each": lambda: _pair(3, image_shape=[3], text_shape=[3]),
    "one item": lambda: _pair(1),
    "text first": lambda: _pair(2, text_first=True),
    "the largest batch": lambda: _pair(64),
}
# Any other request: the general path answers (all but the first are refused, each with its reason).
OTHER: dict[str, Callable[[], pb.ModelInferRequest]] = {
    "typed contents": _typed,
    "raw and typed contents": _raw_and_typed,
    "batches differ": _mixed_batches,
    "an element short": _short_of_one,
    "not UTF-8": _bad_utf8,
    "a truncated length prefix": _truncated,
    "[N, 2]": lambda: _pair(2, text_shape=[1, 2]),
    "a third input": _extra_input,
    "an empty batch": lambda: _pair(0),
    "over the largest batch": lambda: _pair(65),
    "another datatype": lambda: _pair(1, datatype="UINT8"),
    "shared memory": lambda: _pair(1, shared_memory_region="region"),
}


def _outcome(read: Callable[[], Any]) -> Any:
    """What a reading gives: its value, or the error's type and message."""
    try:
        return read()
    except FusionServeError as e:
        return type(e), str(e)


@pytest.fixture(scope="module")
def multimodal(server) -> tuple[Any, Any, int]:
    entry = server.server.core.registry.find("multimodal")
    assert entry.config is not None and entry.pipeline is not None
    return entry.config, entry.pipeline.plan, entry.max_batch_size


@pytest.mark.parametrize("form", COMMON)
def test_the_common_form_is_read_directly_and_as_the_general_path_reads_it(multimodal, form):
    config, plan, most = multimodal
    assert most == 64  # "the largest batch" above is at it
    request = COMMON[form]()
    direct = _raw_items(request, config, plan, most)
    assert direct is not None, "the common form went the general way"
    assert direct == _decoded_items(request, config, plan, most) == pipeline_items(request, config, plan, most)
    images, texts = direct
    assert images == [PNG] * len(images) and texts == (CAPTIONS * len(texts))[: len(texts)]


@pytest.mark.parametrize("form", OTHER)
def test_any_other_request_goes_the_general_way(multimodal, form):
    config, plan, most = multimodal
    request = OTHER[form]()
    assert _raw_items(request, config, plan, most) is None
    general = _outcome(lambda: _decoded_items(request, config, plan, most))
    assert _outcome(lambda: pipeline_items(request, config, plan, most)) == general
    if form != "typed contents":
        assert isinstance(general, tuple) and isinstance(general[0], type), f"{form} should be refused"


def test_shapes_are_read_against_the_configs_own(multimodal):
    """A config of [-1, 1] takes [N, 1] only, one of [-1, 2] neither: the rest go the general way (refused)."""
    config, plan, most = multimodal

    def shaped(*shape: int) -> Any:
        return dataclasses.replace(config, inputs=tuple(dataclasses.replace(t, shape=shape) for t in config.inputs))

    column, pairs = shaped(-1, 1), shaped(-1, 2)
    assert _raw_items(_pair(2), column, plan, most) is not None
    for request, declared in ((_pair(2, image_shape=[2], text_shape=[2]), column), (_pair(2), pairs)):
        assert _raw_items(request, declared, plan, most) is None
        with pytest.raises(FusionServeError, match="does not match"):
            pipeline_items(request, declared, plan, most)
