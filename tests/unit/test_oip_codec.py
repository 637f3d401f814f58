"""The Open Inference Protocol's tensors: JSON data and the binary extension read into arrays, and answers
written back, byte for byte as tritonclient expects them."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from service.api.oip.codec import HEADER_LENGTH, ProtocolError, Tensor, encode_infer_response, parse_infer_request


def _binary_request(arrays: dict[str, tuple[str, np.ndarray]], extra: dict | None = None) -> tuple[bytes, str]:
    inputs, raw = [], b""
    for name, (datatype, array) in arrays.items():
        data = array.tobytes()
        inputs.append({"name": name, "datatype": datatype, "shape": list(array.shape),
                       "parameters": {"binary_data_size": len(data)}})
        raw += data
    header = json.dumps({"inputs": inputs, **(extra or {})}).encode()
    return header + raw, str(len(header))


def test_json_and_binary_inputs_read_into_the_same_array():
    image = np.random.default_rng(0).random((2, 3, 4, 4), dtype=np.float32)
    as_json = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [2, 3, 4, 4],
                                      "data": image.reshape(-1).tolist()}]}).encode()
    body, length = _binary_request({"image": ("FP32", image)})
    from_json, from_binary = parse_infer_request(as_json, None, 10**6), parse_infer_request(body, length, 10**6)
    np.testing.assert_array_equal(from_json.inputs[0].array, image)
    np.testing.assert_array_equal(from_binary.inputs[0].array, image)
    nested = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 2], "data": [[3, 250]]}]})
    assert parse_infer_request(nested.encode(), None, 10).inputs[0].array.tolist() == [[3, 250]]


def test_requested_outputs_and_their_binary_flags_are_read():
    body, length = _binary_request({"image": ("UINT8", np.zeros((1, 3, 2, 2), np.uint8))}, {
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "predicted_group"}],
        "parameters": {"binary_data_output": False}, "id": "request-7"})
    request = parse_infer_request(body, length, 100)
    assert request.outputs == {"probabilities": True, "predicted_group": None}
    assert request.binary_outputs is False and request.id == "request-7"


_BINARY_2 = b'{"inputs": [{"name": "i", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]}'


@pytest.mark.parametrize("header, tail, says", [
    (b"not json", None, "not JSON"),
    (b'{"inputs": []}', None, "non-empty list of inputs"),
    (b'{"inputs": [{"name": "image", "datatype": "FP16", "shape": [1], "data": [1]}]}', None, "FP32 or UINT8"),
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [2], "data": [1]}]}', None, "1 values for shape"),
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [-1], "data": [1]}]}', None, "non-negative"),
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1000], "data": []}]}', None, "over this server"),
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": ["x"]}]}', None, "FP32 numbers"),
    (_BINARY_2, b"\x00\x00", "ends before"),
    (_BINARY_2.replace(b": 8", b": 4"), b"\x00" * 4, "must be 8 bytes"),
    (b'{"inputs": [{"name": "i", "datatype": "UINT8", "shape": [1], "data": [1]}]}', b"xyz", "belong to no input"),
])
def test_requests_that_break_the_protocol_say_how(header, tail, says):
    body, length = (header, None) if tail is None else (header + tail, str(len(header)))
    with pytest.raises(ProtocolError, match=says):
        parse_infer_request(body, length, 100)


def test_a_header_length_past_the_body_is_refused():
    with pytest.raises(ProtocolError, match=HEADER_LENGTH):
        parse_infer_request(b'{"inputs": []}', "9999", 100)


def test_binary_outputs_follow_the_json_header_and_bytes_elements_carry_their_length():
    probabilities = np.array([[0.25, 0.75]], dtype=np.float32)
    groups = np.array([b"few"], dtype=object)
    body, headers = encode_infer_response("m", "2", "r1", [Tensor("probabilities", "FP32", probabilities),
                                                           Tensor("predicted_group", "BYTES", groups)],
                                          {"probabilities": True, "predicted_group": True})
    header_length = int(headers[HEADER_LENGTH])
    document = json.loads(body[:header_length])
    assert document["model_version"] == "2" and document["id"] == "r1"
    assert [o["parameters"]["binary_data_size"] for o in document["outputs"]] == [8, 7]
    raw = body[header_length:]
    np.testing.assert_array_equal(np.frombuffer(raw[:8], np.float32).reshape(1, 2), probabilities)
    assert raw[8:] == struct.pack("<I", 3) + b"few"


def test_json_outputs_carry_nan_as_null():
    body, headers = encode_infer_response("m", "1", None, [
        Tensor("group_accuracy", "FP32", np.array([0.5, np.nan], dtype=np.float32))], {})
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["outputs"][0]["data"] == [0.5, None]
