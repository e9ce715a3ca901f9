"""Malformed request bytes (bad UTF-8, nesting past the parser's limit, truncation) sent straight to
the real server: each answers INVALID_ARGUMENT naming the message, and logs one line, no traceback."""
import grpc
import pytest

from memlm.v1 import memlm_pb2 as pb

pytestmark = pytest.mark.server


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _nested_struct(depth: int) -> bytes:
    """A google.protobuf.Struct {"a": {"a": ... }} `depth` levels deep, encoded by hand (the
    Python protobuf runtime refuses to build one past its own limit)."""
    struct = b""
    for _ in range(depth):
        value = _field(5, struct)  # Value.struct_value
        struct = _field(1, _field(1, b"a") + _field(2, value))  # Struct.fields map entry
    return struct


BAD_UTF8 = _field(1, b"\xff\xfe")  # string field 1 (`collection`) holding bytes that are not UTF-8
TRUNCATED = _field(1, b"abcdef")[:-3]  # says 6 bytes follow, 3 do


def _unary(channel, method):
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


@pytest.mark.parametrize("payload", [BAD_UTF8, TRUNCATED], ids=["bad-utf8", "truncated"])
@pytest.mark.parametrize(
    "method", ["/memlm.v1.Memory/DescribeCollection", "/memlm.v1.Memory/Search", "/memlm.v1.Generation/Generate"]
)
def test_malformed_request_is_invalid_argument(server, method, payload):
    with grpc.insecure_channel(server.address) as channel:
        if method.endswith("Generate"):
            call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as err:
                list(call(payload, timeout=30))
        else:
            with pytest.raises(grpc.RpcError) as err:
                _unary(channel, method)(payload, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert "could not be decoded" in err.value.details()


def test_malformed_ingest_messages_are_invalid_argument_and_store_nothing(server, client, collection):
    good = pb.IngestRequest(collection=collection, documents=[pb.Document(id="ok", text="a fine document")])
    deep = pb.IngestRequest(collection=collection).SerializeToString() + _field(
        2, _field(1, b"deep") + _field(2, b"text") + _field(3, _nested_struct(200))
    )
    bad_utf8_doc = _field(1, collection.encode()) + _field(2, _field(1, b"\xc3\x28") + _field(2, b"text"))
    log_lines_before = len(server.lines)
    with grpc.insecure_channel(server.address) as channel:
        ingest = channel.stream_unary("/memlm.v1.Memory/Ingest", request_serializer=None, response_deserializer=None)
        for second in (deep, bad_utf8_doc, TRUNCATED):
            with pytest.raises(grpc.RpcError) as err:
                ingest(iter([good.SerializeToString(), second]), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
            assert "message 1" in err.value.details() and "IngestRequest" in err.value.details()
        # the deep Struct also fails alone, as the first message
        with pytest.raises(grpc.RpcError) as err:
            ingest(iter([deep]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.describe_collection(collection).documents == 0  # a call that fails stores nothing
    new_lines = server.lines[log_lines_before:]
    assert not any("Traceback" in line for line in new_lines), "".join(new_lines)
    assert len([line for line in new_lines if "could not be decoded" in line]) == 4, "".join(new_lines)
