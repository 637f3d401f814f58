"""The Open Inference Protocol's (KServe v2, as Triton serves it) REST tensors: JSON `data` or the binary
tensor extension, read into numpy arrays and written back. Pure functions, no web framework.

Binary extension: the body is a JSON header of `Inference-Header-Content-Length` bytes followed by the raw
tensors, in the order of the inputs whose `parameters.binary_data_size` says how many bytes each takes
(little-endian, row-major; a BYTES element is a 4-byte little-endian length, then its bytes).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
# the datatypes this server reads (images: FP32 in [0, 1] or UINT8 in [0, 255]) and writes
DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1"), "INT64": np.dtype("<i8")}


class ProtocolError(ValueError):
    """A request that does not follow the protocol: the client gets a 400 with this message as `error`."""


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # FP32, UINT8, INT64 or BYTES
    array: np.ndarray  # BYTES: an object array of bytes


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: dict[str, bool] | None  # the outputs asked for, each with whether it goes binary; None: all
    binary_outputs: bool  # the request's default for outputs not named


def _shape(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise ProtocolError(f"{where}: shape must be a list of non-negative integers")
    return tuple(value)


def _binary_flag(parameters: object, where: str) -> bool | None:
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        raise ProtocolError(f"{where}: parameters must be an object")
    flag = parameters.get("binary_data")
    if flag is not None and not isinstance(flag, bool):
        raise ProtocolError(f"{where}: binary_data must be true or false")
    return flag


def parse_infer_request(body: bytes, header_length: str | None, max_elements: int) -> InferRequest:
    """The request's inputs as arrays. `header_length` is the Inference-Header-Content-Length header (None: the
    whole body is JSON); `max_elements` bounds each input's element count before anything is allocated."""
    if header_length is None:
        header, raw = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ProtocolError(f"{HEADER_LENGTH} must be the length of the JSON header, at most the body's")
        header, raw = body[:int(header_length)], body[int(header_length):]
    try:
        document = json.loads(header)
    except ValueError as exc:
        raise ProtocolError(f"the request header is not JSON: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list) or not document["inputs"]:
        raise ProtocolError("the request must be an object with a non-empty list of inputs")
    inputs, offset = [], 0
    for i, item in enumerate(document["inputs"]):
        where = f"inputs[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError(f"{where}: an input is an object with a name")
        where = f"input {item['name']!r}"
        datatype = item.get("datatype")
        if datatype not in ("FP32", "UINT8"):
            raise ProtocolError(f"{where}: datatype must be FP32 or UINT8, not {datatype!r}")
        dtype, shape = DTYPES[datatype], _shape(item.get("shape"), where)
        count = math.prod(shape)
        if count > max_elements:
            raise ProtocolError(f"{where}: {count} elements, over this server's {max_elements}")
        parameters = item.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ProtocolError(f"{where}: parameters must be an object")
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size != count * dtype.itemsize:
                raise ProtocolError(f"{where}: binary_data_size must be {count * dtype.itemsize} bytes for shape "
                                    f"{list(shape)}")
            if offset + size > len(raw):
                raise ProtocolError(f"{where}: the body ends before its {size} bytes of binary data")
            array = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape)
            offset += size
        else:
            try:
                array = np.asarray(item.get("data"), dtype=dtype)
            except (TypeError, ValueError, OverflowError) as exc:
                raise ProtocolError(f"{where}: data must be {datatype} numbers") from exc
            if array.size != count:
                raise ProtocolError(f"{where}: {array.size} values for shape {list(shape)} ({count})")
            array = array.reshape(shape)
        inputs.append(Tensor(item["name"], datatype, array))
    if offset != len(raw):
        raise ProtocolError(f"{len(raw) - offset} bytes of binary data belong to no input")
    outputs = None
    if document.get("outputs") is not None:
        if not isinstance(document["outputs"], list):
            raise ProtocolError("outputs must be a list")
        outputs = {}
        for i, item in enumerate(document["outputs"]):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise ProtocolError(f"outputs[{i}]: an output is an object with a name")
            outputs[item["name"]] = _binary_flag(item.get("parameters"), f"output {item['name']!r}")
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict) or not isinstance(parameters.get("binary_data_output", False), bool):
        raise ProtocolError("parameters must be an object whose binary_data_output is true or false")
    binary_default = parameters.get("binary_data_output", False)
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("id must be a string")
    return InferRequest(request_id, inputs, outputs, binary_default)


def _raw(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in tensor.array.reshape(-1))
    return np.ascontiguousarray(tensor.array, dtype=DTYPES[tensor.datatype]).tobytes()


def _json_data(tensor: Tensor) -> list:
    if tensor.datatype == "BYTES":
        return [v.decode("utf-8", errors="replace") for v in tensor.array.reshape(-1)]
    values = tensor.array.reshape(-1).tolist()
    if tensor.datatype == "FP32":  # JSON has no NaN: an empty group's accuracy travels as null
        return [None if v != v else v for v in values]
    return values


def encode_infer_response(model_name: str, model_version: str, request_id: str | None, tensors: list[Tensor],
                          binary: dict[str, bool]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or JSON followed by the outputs that go binary."""
    outputs, chunks = [], []
    for tensor in tensors:
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.array.shape)}
        if binary.get(tensor.name):
            chunk = _raw(tensor)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = _json_data(tensor)
        outputs.append(entry)
    document = {"model_name": model_name, "model_version": model_version, "outputs": outputs}
    if request_id is not None:
        document["id"] = request_id
    header = json.dumps(document, separators=(",", ":")).encode()
    if not chunks:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(chunks), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
