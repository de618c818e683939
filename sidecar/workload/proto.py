"""The few protobuf messages of the SPIFFE `workload.proto`, encoded and decoded by hand.

The Workload API needs five request and six response messages, all strings,
bytes, maps of string to bytes and one `google.protobuf.Struct`. Writing the
wire format directly (varints and length-delimited fields, proto3 rules:
unknown fields skipped, the last scalar wins) keeps the sidecar free of
generated code, which would otherwise register `workload.proto` in
protobuf's global descriptor pool next to the copy py-spiffe registers, and
free of the `protobuf` runtime. Pure: bytes in, values out.

Field numbers are those of the specification's `workload.proto` (package
left empty, so the service is `/SpiffeWorkloadAPI/...`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

_VARINT = 0
_FIXED64 = 1
_LEN = 2
_FIXED32 = 5


class DecodeError(ValueError):
    """The bytes are not a protobuf message of the expected shape."""


# -- encoding ---------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, _LEN) + _varint(len(payload)) + payload


def _string(number: int, text: str) -> bytes:
    """A proto3 string field; the default (empty) is left out, as proto3 does."""
    return _len_field(number, text.encode()) if text else b""


def _bytes(number: int, data: bytes) -> bytes:
    return _len_field(number, data) if data else b""


def _map_entries(number: int, entries: Mapping[str, bytes]) -> bytes:
    return b"".join(
        _len_field(number, _len_field(1, k.encode()) + _len_field(2, v))
        for k, v in sorted(entries.items())
    )


@dataclass(frozen=True, slots=True)
class X509Svid:
    spiffe_id: str
    x509_svid: bytes  # DER certificates, leaf first, concatenated
    x509_svid_key: bytes  # PKCS#8 DER
    bundle: bytes  # DER root certificates, concatenated
    hint: str = ""

    def encode(self) -> bytes:
        return (
            _string(1, self.spiffe_id)
            + _bytes(2, self.x509_svid)
            + _bytes(3, self.x509_svid_key)
            + _bytes(4, self.bundle)
            + _string(5, self.hint)
        )


def x509_svid_response(
    svids: Sequence[X509Svid], federated_bundles: Mapping[str, bytes] | None = None
) -> bytes:
    return b"".join(_len_field(1, s.encode()) for s in svids) + _map_entries(
        3, federated_bundles or {}
    )


def x509_bundles_response(bundles: Mapping[str, bytes]) -> bytes:
    return _map_entries(2, bundles)


def jwt_svid_response(svids: Sequence[tuple[str, str]]) -> bytes:
    """(spiffe_id, token) pairs."""
    return b"".join(_len_field(1, _string(1, sid) + _string(2, token)) for sid, token in svids)


def jwt_bundles_response(bundles: Mapping[str, bytes]) -> bytes:
    return _map_entries(1, bundles)


def validate_jwt_svid_response(spiffe_id: str, claims: Mapping[str, object]) -> bytes:
    return _string(1, spiffe_id) + _len_field(2, _struct(claims))


# google.protobuf.Struct / Value / ListValue


def _struct(fields: Mapping[str, object]) -> bytes:
    return b"".join(
        _len_field(1, _len_field(1, k.encode()) + _len_field(2, _value(v)))
        for k, v in fields.items()
    )


def _value(value: object) -> bytes:
    if value is None:
        return _key(1, _VARINT) + _varint(0)
    if isinstance(value, bool):
        return _key(4, _VARINT) + _varint(int(value))
    if isinstance(value, int | float):
        return _key(2, _FIXED64) + struct.pack("<d", float(value))
    if isinstance(value, str):
        return _len_field(3, value.encode())
    if isinstance(value, Mapping):
        return _len_field(5, _struct({str(k): v for k, v in value.items()}))
    if isinstance(value, list | tuple):
        return _len_field(6, b"".join(_len_field(1, _value(v)) for v in value))
    return _len_field(3, str(value).encode())


# -- decoding ---------------------------------------------------------------------


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & ((1 << 64) - 1), pos
    raise DecodeError("varint too long")


def fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(number, wire type, value) for each field; unknown wire types are an error."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise DecodeError("field number 0")
        if wire_type == _VARINT:
            value, pos = _read_varint(data, pos)
            yield number, wire_type, value
        elif wire_type == _LEN:
            size, pos = _read_varint(data, pos)
            if size > len(data) - pos:
                raise DecodeError("truncated field")
            yield number, wire_type, data[pos : pos + size]
            pos += size
        elif wire_type == _FIXED64:
            if pos + 8 > len(data):
                raise DecodeError("truncated field")
            yield number, wire_type, data[pos : pos + 8]
            pos += 8
        elif wire_type == _FIXED32:
            if pos + 4 > len(data):
                raise DecodeError("truncated field")
            yield number, wire_type, data[pos : pos + 4]
            pos += 4
        else:
            raise DecodeError(f"unsupported wire type {wire_type}")


def _text(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise DecodeError("expected a string field")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise DecodeError("string field is not UTF-8") from None


@dataclass(frozen=True, slots=True)
class JwtSvidRequest:
    audience: tuple[str, ...]
    spiffe_id: str

    @classmethod
    def decode(cls, data: bytes) -> JwtSvidRequest:
        audience: list[str] = []
        spiffe_id = ""
        for number, _, value in fields(data):
            if number == 1:
                audience.append(_text(value))
            elif number == 2:
                spiffe_id = _text(value)
        return cls(tuple(audience), spiffe_id)

    def encode(self) -> bytes:
        return b"".join(_len_field(1, a.encode()) for a in self.audience) + _string(
            2, self.spiffe_id
        )


@dataclass(frozen=True, slots=True)
class ValidateJwtSvidRequest:
    audience: str
    svid: str

    @classmethod
    def decode(cls, data: bytes) -> ValidateJwtSvidRequest:
        audience = svid = ""
        for number, _, value in fields(data):
            if number == 1:
                audience = _text(value)
            elif number == 2:
                svid = _text(value)
        return cls(audience, svid)

    def encode(self) -> bytes:
        return _string(1, self.audience) + _string(2, self.svid)


def check_empty_request(data: bytes) -> None:
    """The requests that carry no field still have to be well-formed protobuf."""
    for _ in fields(data):
        pass


# -- responses, decoded (for our own client, `meshid workload …`) ------------------


def _bytes_of(value: int | bytes) -> bytes:
    if not isinstance(value, bytes):
        raise DecodeError("expected a length-delimited field")
    return value


def _map_entry(data: bytes) -> tuple[str, bytes]:
    key, value = "", b""
    for number, _, field_value in fields(data):
        if number == 1:
            key = _text(field_value)
        elif number == 2:
            value = _bytes_of(field_value)
    return key, value


def decode_x509_svid_response(data: bytes) -> list[X509Svid]:
    svids: list[X509Svid] = []
    for number, _, value in fields(data):
        if number != 1:
            continue
        parts: dict[int, int | bytes] = {n: v for n, _, v in fields(_bytes_of(value))}
        svids.append(
            X509Svid(
                spiffe_id=_text(parts.get(1, b"")),
                x509_svid=_bytes_of(parts.get(2, b"")),
                x509_svid_key=_bytes_of(parts.get(3, b"")),
                bundle=_bytes_of(parts.get(4, b"")),
                hint=_text(parts.get(5, b"")),
            )
        )
    return svids


def decode_jwt_svid_response(data: bytes) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for number, _, value in fields(data):
        if number == 1:
            parts = {n: v for n, _, v in fields(_bytes_of(value))}
            found.append((_text(parts.get(1, b"")), _text(parts.get(2, b""))))
    return found


def decode_bundles(data: bytes, number: int) -> dict[str, bytes]:
    """The map field `number` (X509BundlesResponse: 2, JWTBundlesResponse: 1)."""
    return dict(_map_entry(_bytes_of(v)) for n, _, v in fields(data) if n == number)


def decode_validate_response(data: bytes) -> tuple[str, dict[str, object]]:
    spiffe_id, claims = "", {}
    for number, _, value in fields(data):
        if number == 1:
            spiffe_id = _text(value)
        elif number == 2:
            claims = _decode_struct(_bytes_of(value), 0)
    return spiffe_id, claims


_MAX_DEPTH = 32


def _decode_struct(data: bytes, depth: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for number, _, value in fields(data):
        if number == 1:
            key, raw = _map_entry(_bytes_of(value))
            out[key] = _decode_value(raw, depth + 1)
    return out


def _decode_value(data: bytes, depth: int) -> object:
    if depth > _MAX_DEPTH:
        raise DecodeError("value nested too deeply")
    result: object = None
    for number, _, value in fields(data):
        if number == 2 and isinstance(value, bytes) and len(value) == 8:
            number_value = struct.unpack("<d", value)[0]
            result = int(number_value) if number_value.is_integer() else number_value
        elif number == 3:
            result = _text(value)
        elif number == 4:
            result = bool(value)
        elif number == 5:
            result = _decode_struct(_bytes_of(value), depth)
        elif number == 6:
            result = [
                _decode_value(_bytes_of(v), depth + 1)
                for n, _, v in fields(_bytes_of(value))
                if n == 1
            ]
    return result
