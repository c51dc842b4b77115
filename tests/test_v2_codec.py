"""The V2 codec against the protocol's byte layout, written out by hand (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from fusionserve.errors import InvalidInputError
from fusionserve.v2 import grpc_service_pb2 as pb
from fusionserve.v2_codec import (
    add_raw_input,
    datatype_of,
    decode_outputs,
    decode_tensor,
    deserialize_bytes,
    fill_contents,
    serialize_bytes,
    to_raw,
)


def test_bytes_elements_are_four_byte_little_endian_lengths_then_the_bytes():
    assert serialize_bytes([b"ab", "é", b""]) == b"\x02\x00\x00\x00ab" + b"\x02\x00\x00\x00\xc3\xa9" + b"\x00" * 4
    assert deserialize_bytes(b"\x02\x00\x00\x00ab\x00\x00\x00\x00", "x") == [b"ab", b""]


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"\x02\x00\x00", "truncated length prefix"), (b"\x05\x00\x00\x00abc", "claims 5 bytes, but only 3 remain")],
)
def test_broken_bytes_framing_names_the_tensor(data: bytes, message: str):
    with pytest.raises(InvalidInputError, match=f"input 'TEXT': BYTES element 0 .*{message}"):
        deserialize_bytes(data, "TEXT")


def test_numbers_travel_little_endian():
    assert to_raw(np.array([1, 256], np.int32), "INT32") == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert to_raw(np.array([1.0], np.float32), "FP32") == b"\x00\x00\x80\x3f"


@pytest.mark.parametrize(("array", "datatype"), [
    (np.arange(6, dtype=np.float32).reshape(2, 3), "FP32"),
    (np.array([[-3, 7]], np.int64), "INT64"),
    (np.array([True, False]), "BOOL"),
    (np.array([1.5, -2.0], np.float16), "FP16"),
    (np.array([b"png bytes", b"\x00\xff"], dtype=object), "BYTES"),
])  # fmt: skip
def test_raw_and_typed_forms_decode_to_what_was_sent(array: np.ndarray, datatype: str):
    assert datatype_of(array) == datatype
    raw = pb.ModelInferRequest()
    add_raw_input(raw, "t", array)
    np.testing.assert_array_equal(decode_tensor(raw.inputs[0], raw.raw_input_contents[0]), array)
    if datatype != "FP16":  # FP16 has no typed field
        tensor = pb.ModelInferRequest.InferInputTensor(name="t", datatype=datatype, shape=array.shape)
        fill_contents(tensor.contents, array, datatype)
        np.testing.assert_array_equal(decode_tensor(tensor), array)


def test_decode_outputs_takes_raw_or_typed_responses():
    response = pb.ModelInferResponse()
    response.outputs.add(name="p", datatype="FP32", shape=[1, 2])
    fill_contents(response.outputs[0].contents, np.array([[0.25, 0.75]], np.float32), "FP32")
    np.testing.assert_array_equal(decode_outputs(response)["p"], [[0.25, 0.75]])


@pytest.mark.parametrize(("datatype", "shape", "raw", "message"), [
    ("FP32", [2], b"\x00" * 7, "raw contents hold 7 bytes, shape \\[2\\] of FP32 needs 8"),
    ("FP32", [-1], b"", "negative dimension"),
    ("BOOL", [1], b"\x02", "BOOL elements must be bytes 0 or 1"),
    ("WHAT", [1], b"\x00", "unknown datatype 'WHAT'"),
    ("BYTES", [2], serialize_bytes([b"a"]), "hold 1 BYTES elements, shape \\[2\\] needs 2"),
])  # fmt: skip
def test_contents_that_do_not_fit_are_refused(datatype: str, shape: list[int], raw: bytes, message: str):
    tensor = pb.ModelInferRequest.InferInputTensor(name="t", datatype=datatype, shape=shape)
    with pytest.raises(InvalidInputError, match=message):
        decode_tensor(tensor, raw)


def test_narrow_integers_in_wide_typed_fields_are_range_checked():
    tensor = pb.ModelInferRequest.InferInputTensor(name="t", datatype="INT8", shape=[2])
    tensor.contents.int_contents.extend([1, 300])
    with pytest.raises(InvalidInputError, match=r"values out of the INT8 range \[-128, 127\]"):
        decode_tensor(tensor)
