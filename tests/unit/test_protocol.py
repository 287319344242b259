"""The wire protocol treats every guest byte as hostile."""

from __future__ import annotations

import struct

import pytest

from ember.errors import GuestProtocolError, InvalidRequest
from ember.guest.protocol import (
    HEADER,
    MAX_PAYLOAD,
    TOKEN_MAX,
    TOKEN_MIN,
    Msg,
    Tag,
    decode_entries,
    decode_fields,
    decode_header,
    encode_fields,
    encode_frame,
    field_int,
    field_str,
    hello_answers,
    hello_frames,
)


def test_fields_round_trip() -> None:
    raw = encode_fields([(Tag.ARG, "sh"), (Tag.ARG, "-c"), (Tag.TIMEOUT_MS, 1500), (Tag.STDIN, True)])
    fields = decode_fields(raw)
    assert fields[Tag.ARG] == [b"sh", b"-c"]
    assert field_int(fields, Tag.TIMEOUT_MS) == 1500
    assert field_int(fields, Tag.STDIN) == 1
    assert field_str(fields, Tag.CWD, "/") == "/"


def test_oversized_and_unknown_frames_are_rejected() -> None:
    with pytest.raises(GuestProtocolError, match="exceeds"):
        decode_header(HEADER.pack(MAX_PAYLOAD + 1, 1, Msg.STDOUT))
    with pytest.raises(GuestProtocolError, match="unknown guest message"):
        decode_header(HEADER.pack(0, 1, Msg.EXEC))  # a host->guest type coming back
    with pytest.raises(ValueError):
        encode_frame(Msg.WDATA, 1, b"x" * (MAX_PAYLOAD + 1))


@pytest.mark.parametrize(
    "payload",
    [
        b"\x01\x05\x00",  # truncated header
        b"\x01" + struct.pack("<I", 100) + b"short",  # length past the end
        b"\xee" + struct.pack("<I", 0),  # unknown tag
    ],
)
def test_malformed_fields_are_rejected(payload: bytes) -> None:
    with pytest.raises(GuestProtocolError):
        decode_fields(payload)


def test_bad_integer_sizes_and_nul_in_strings() -> None:
    fields = decode_fields(bytes([Tag.EXIT_CODE]) + struct.pack("<I", 3) + b"abc")
    with pytest.raises(GuestProtocolError, match="bad size"):
        field_int(fields, Tag.EXIT_CODE)
    for tag in (Tag.ARG, Tag.ENV, Tag.CWD, Tag.USER, Tag.PATH):
        with pytest.raises(InvalidRequest, match="NUL") as err:
            encode_fields([(tag, "a\x00b")])
        assert err.value.http_status == 400


def test_protocol_errors_are_503_guest_errors() -> None:
    with pytest.raises(GuestProtocolError) as err:
        decode_fields(b"\x01\x05\x00")
    assert err.value.http_status == 503 and "malformed reply" in str(err.value)


def test_directory_entries_are_bounds_checked() -> None:
    good = struct.pack("<I", 3) + struct.pack("<IQq", 0o100644, 10, 0) + b"abc"
    assert next(decode_entries(good)).name == "abc"
    with pytest.raises(GuestProtocolError):
        list(decode_entries(struct.pack("<I", 9999) + struct.pack("<IQq", 0, 0, 0) + b"abc"))
    with pytest.raises(GuestProtocolError):
        list(decode_entries(good[:-1] + b""))


def entry(name: bytes) -> bytes:
    return struct.pack("<I", len(name)) + struct.pack("<IQq", 0o100644, 10, 0) + name


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"/", b"a\x00b", b"x" * 256])
def test_directory_entry_names_must_be_real_file_names(name: bytes) -> None:
    with pytest.raises(GuestProtocolError, match="name"):
        list(decode_entries(entry(b"fine") + entry(name)))


def test_directory_entry_names_up_to_name_max_of_any_bytes_are_taken() -> None:
    names = [b"x" * 255, b"...", b"a b\\c", b"\xff"]
    assert [e.name for e in decode_entries(b"".join(entry(n) for n in names))] == ["x" * 255, "...", "a b\\c", "\ufffd"]


def test_set_token_goes_ahead_of_hello_only_on_first_boot_and_tokens_are_bounded() -> None:
    nonce, token = bytes(range(16)), "ab" * 16
    hello = encode_frame(Msg.HELLO, 0, encode_fields([(Tag.TOKEN, token), (Tag.NONCE, nonce)]))
    set_token = encode_frame(Msg.SET_TOKEN, 0, encode_fields([(Tag.TOKEN, token)]))
    assert hello_frames(token, nonce, first_boot=False) == hello
    assert hello_frames(token, nonce, first_boot=True) == set_token + hello
    for bad in ("x" * (TOKEN_MIN - 1), "x" * (TOKEN_MAX + 1), "é" * (TOKEN_MAX // 2 + 1)):  # the agent refuses these
        with pytest.raises(ValueError, match="agent token"):
            hello_frames(bad, nonce, first_boot=True)
    hello_frames("x" * TOKEN_MIN, nonce, first_boot=True)
    hello_frames("x" * TOKEN_MAX, nonce, first_boot=True)


def test_hello_answers_are_bound_to_the_nonce_and_set_token_never_comes_back() -> None:
    nonce = bytes(range(16))
    accepted, refused = hello_answers(nonce)
    assert accepted != refused and len(accepted) == len(refused)
    assert decode_header(refused[: HEADER.size]) == (8 + len(nonce), 0, Msg.HELLO_NAK)
    assert accepted.endswith(nonce) and refused.endswith(nonce)
    assert hello_answers(bytes(16)) != (accepted, refused)
    with pytest.raises(GuestProtocolError, match="unknown guest message"):
        decode_header(HEADER.pack(0, 0, Msg.SET_TOKEN))  # a host->guest type coming back
