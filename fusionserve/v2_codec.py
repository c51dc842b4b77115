"""Open Inference Protocol (KServe V2) tensors ↔ NumPy, for the server, the clients and the benches.

A V2 tensor travels in one of two forms. Typed: ``contents.<field>``, the field its datatype is
assigned (``CONTENTS_FIELD``; FP16 has none and must be raw). Raw: one bytes entry per tensor in
``raw_input_contents`` / ``raw_output_contents``, little-endian, and for BYTES each element a 4-byte
little-endian length followed by its bytes. Decoding checks what only the wire form can get wrong
(element counts, field choice, framing, narrow integer ranges) and raises InvalidInputError naming
the tensor; what a tensor must be for a given model is the core's to check.

    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[2])
    request.raw_input_contents.append(serialize_bytes([png_1, png_2]))
    array = decode_tensor(response.outputs[0], response.raw_output_contents[0])
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from fusionserve.errors import InvalidInputError
from fusionserve.repository import DATATYPES

# The typed contents field of each datatype, as the protocol assigns them. FP16 has none: raw only.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_LENGTH = struct.Struct("<I")
MAX_NAME_CHARS = 200  # names echoed in error messages are cut to this length


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype of a NumPy array (bytes, str and object arrays are BYTES)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    for name, dtype in DATATYPES.items():
        if dtype == array.dtype:
            return name
    raise ValueError(f"no V2 datatype for NumPy {array.dtype}")


# ---- BYTES framing ---------------------------------------------------------------------------
def serialize_bytes(values: Iterable[Any]) -> bytes:
    """A raw BYTES tensor: each element (bytes, or str as UTF-8) as a 4-byte little-endian length + its bytes."""
    parts = []
    for value in values:
        data = element_bytes(value)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(data: bytes, name: str) -> list[bytes]:
    """Split a raw BYTES tensor into its elements.

    Raises:
        InvalidInputError: a length prefix is cut short or points past the end, naming ``name``.
    """
    items: list[bytes] = []
    view = memoryview(data)
    offset, end = 0, len(data)
    while offset < end:
        if offset + 4 > end:
            raise InvalidInputError(
                f"input {name!r}: BYTES element {len(items)} has a truncated length prefix "
                f"({end - offset} of 4 bytes at offset {offset})"
            )
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if length > end - offset:
            raise InvalidInputError(
                f"input {name!r}: BYTES element {len(items)} claims {length} bytes, but only {end - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    return items


def element_bytes(value: object) -> bytes:
    """One BYTES element as bytes (str as UTF-8, anything else as its text)."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")


def object_array(items: Sequence[Any]) -> np.ndarray:
    """A 1-D object array of ``items`` (equal-length bytes must not become a 2-D array)."""
    array = np.empty(len(items), dtype=np.object_)
    array[:] = list(items)
    return array


# ---- NumPy → wire ----------------------------------------------------------------------------
def to_raw(value: np.ndarray, datatype: str) -> bytes:
    """A tensor's raw contents."""
    if datatype == "BYTES":
        return serialize_bytes(np.asarray(value).reshape(-1))
    return np.ascontiguousarray(value, dtype=DATATYPES[datatype].newbyteorder("<")).tobytes()


def fill_contents(contents: Any, value: np.ndarray, datatype: str) -> None:
    """Write a tensor into an ``InferTensorContents`` message (the field of its datatype)."""
    target = getattr(contents, CONTENTS_FIELD[datatype])
    flat = np.asarray(value).reshape(-1)
    if datatype == "BYTES":
        target.extend(element_bytes(v) for v in flat)
    else:
        target.extend(flat.astype(DATATYPES[datatype], copy=False).tolist())


def add_raw_input(request: Any, name: str, value: np.ndarray | Sequence[Any], datatype: str | None = None) -> None:
    """Append an input tensor in raw form to a ``ModelInferRequest`` (a list of bytes/str is BYTES)."""
    array = object_array(value) if isinstance(value, (list, tuple)) else np.asarray(value)
    datatype = datatype or datatype_of(array)
    request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    request.raw_input_contents.append(to_raw(array, datatype))


# ---- wire → NumPy ----------------------------------------------------------------------------
def element_count(name: str, shape: Sequence[int]) -> int:
    """Elements in ``shape``; InvalidInputError for a negative dimension."""
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"input {name!r}: shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def from_raw(name: str, datatype: str, shape: Sequence[int], data: bytes) -> np.ndarray:
    """A tensor from its raw contents, as a flat array of its datatype (reshape it to ``shape``)."""
    count = element_count(name, shape)
    if datatype == "BYTES":
        items = deserialize_bytes(data, name)
        if len(items) != count:
            raise InvalidInputError(
                f"input {name!r}: raw contents hold {len(items)} BYTES elements, shape {list(shape)} needs {count}"
            )
        return object_array(items)
    dtype = DATATYPES[datatype]
    if len(data) != count * dtype.itemsize:
        raise InvalidInputError(
            f"input {name!r}: raw contents hold {len(data)} bytes, "
            f"shape {list(shape)} of {datatype} needs {count * dtype.itemsize}"
        )
    if datatype == "BOOL":
        octets = np.frombuffer(data, dtype=np.uint8)
        if octets.size and octets.max() > 1:
            raise InvalidInputError(f"input {name!r}: BOOL elements must be bytes 0 or 1")
        return octets.astype(np.bool_)
    # A read-only view of the message's bytes in native byte order: no copy on little-endian hosts
    # (a 64-image batch at 224×224 is 38 MB), a converted copy elsewhere.
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)


def from_contents(name: str, datatype: str, shape: Sequence[int], contents: Any) -> np.ndarray:
    """A tensor from its typed contents, as a flat array of its datatype (reshape it to ``shape``)."""
    count = element_count(name, shape)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInputError(f"input {name!r}: {datatype} has no typed contents field; send it raw")
    for other in (f.name for f in contents.DESCRIPTOR.fields):
        if other != field and len(getattr(contents, other)):
            raise InvalidInputError(
                f"input {name!r}: a {datatype} tensor goes in contents.{field}, not contents.{other}"
            )
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInputError(
            f"input {name!r}: contents.{field} holds {len(values)} elements, shape {list(shape)} needs {count}"
        )
    if datatype == "BYTES":
        return object_array(values)
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu" and dtype.itemsize < 4:  # carried in a 32-bit field: check the range
        wide = np.fromiter(values, dtype=np.int64, count=count)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidInputError(f"input {name!r}: values out of the {datatype} range [{info.min}, {info.max}]")
        return wide.astype(dtype)
    return np.fromiter(values, dtype=dtype, count=count)


def decode_tensor(tensor: Any, raw: bytes | None = None) -> np.ndarray:
    """An input or output tensor message as a NumPy array of its shape, from ``raw`` when given.

    Raises:
        InvalidInputError: an unknown datatype, or contents that do not fit the shape.
    """
    name = tensor.name[:MAX_NAME_CHARS]
    if tensor.datatype not in DATATYPES:
        raise InvalidInputError(
            f"input {name!r}: unknown datatype {tensor.datatype[:MAX_NAME_CHARS]!r}; known: {', '.join(DATATYPES)}"
        )
    shape = list(tensor.shape)
    if raw is not None:
        flat = from_raw(name, tensor.datatype, shape, raw)
    else:
        flat = from_contents(name, tensor.datatype, shape, tensor.contents)
    return flat.reshape(shape)


def decode_outputs(response: Any) -> dict[str, np.ndarray]:
    """Every output of a ``ModelInferResponse`` by name, raw or typed."""
    raw = response.raw_output_contents
    return {t.name: decode_tensor(t, raw[i] if raw else None) for i, t in enumerate(response.outputs)}
