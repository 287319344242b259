"""Ember's host <-> guest-agent wire protocol (pure encoding, no I/O).

The channel is a virtio-serial port. Every message is a frame::

    u32 payload_length | u32 stream | u8 type | 3 reserved bytes | payload

little-endian, payload at most ``MAX_PAYLOAD`` bytes. Control payloads are a
sequence of TLV fields ``u8 tag | u32 length | value``; data payloads are raw.
Stream 0 carries the session handshake; every other request picks a fresh
stream id and all replies for it carry that id.

The agent's token never travels on a command line (host ``ps`` shows QEMU's
``-append``, guest users read ``/proc/cmdline``). A freshly booted agent (PID 1,
before it has run anything) has no token and takes exactly one: the first
well-formed SET_TOKEN on its port, which only the host can write to (trust on
first use); it refuses every later one. Then HELLO proves the token: the agent
answers HELLO_ACK or HELLO_NAK, each echoing the host's fresh nonce (so bytes
left by an earlier session are never taken for the answer). The token changes
only with an authenticated RESTORE (NEW_TOKEN), as every restore does.

The host treats every byte from the guest as hostile: lengths are bounded
before anything is allocated, unknown types or tags are protocol errors
(:class:`~ember.errors.GuestProtocolError`, HTTP 503), and integer fields are
checked for size. ``agent.c`` mirrors these constants.

Exec stdin is flow-controlled: STARTED carries the agent's initial stdin credit
(SIZE, bytes) and CREDIT frames grant more as the agent writes to the command's
stdin (CLOSED set: the command closed its stdin, send nothing more). The host
never sends more STDIN bytes than it was granted.

A PTY exec is an exec whose stdin, stdout and stderr are one pseudo-terminal: its output
comes as STDOUT frames, its input as STDIN within the same credit, and RESIZE changes the
terminal's size. A DETACH exec starts in the background and is answered by STARTED alone;
the agent keeps at most MAX_PROCS of them (an exited one gives its place to a new one), PS
lists them and KILL signals only them (never another guest process).

TCP relays (the ingress) are credit-based both ways. TCP_CONNECT (PORT, SIZE: the bytes the host
may take now) opens 127.0.0.1:PORT in the guest; TCP_CONNECTED carries the agent's window (SIZE)
for the host's TCP_SEND bytes, given back by CREDIT frames (CLOSED: the app stopped reading). The
agent reads the socket only within the host's credit, which TCP_CREDIT renews as the host forwards
what it got, so a guest can never make the host hold more than one window per relay. TCP_SHUT and
TCP_EOF are the two half-closes; SIGNAL drops the relay. A refused connection is an ERROR (ERRNO).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ember.errors import GuestProtocolError, InvalidRequest

HEADER = struct.Struct("<IIB3x")
MAX_PAYLOAD = 256 * 1024
ACK_MAGIC = b"EMBERACK"
NAK_MAGIC = b"EMBERNAK"  # HELLO_NAK: the agent refused this token (or has none yet)
NONCE_LEN = 16
TOKEN_MIN, TOKEN_MAX = 16, 128  # bytes of an agent token (the host makes 32 hex digits)
ENTRY_HEADER = struct.Struct("<IQq")  # mode, size, mtime (seconds)
NAME_MAX = 255  # the longest file name (bytes) a directory entry has
PTY_MAX_DIM = 1000  # a terminal's most rows and columns
MAX_PROCS = 64  # background processes the agent tracks (running ones, and exited ones until evicted)
TCP_WINDOW = 256 * 1024  # the credit the host grants a relay: the most of it the host holds at once
HOOK_BODY_MAX = 64 * 1024  # the agent's bound on a hook request's body
HOOK_ANSWER_MAX = 4096  # the most of a hook's answer the agent returns
MAX_ID = 2**32 - 2  # the largest uid or gid: (uid_t)-1 means "leave unchanged" to setuid() and chown()


class Msg(enum.IntEnum):
    # host -> guest
    HELLO = 1
    EXEC = 2
    STDIN = 3
    STDIN_EOF = 4
    SIGNAL = 5
    WRITE = 6
    WDATA = 7
    WEOF = 8
    READ = 9
    LIST = 10
    RESTORE = 11
    SYNC = 12
    PING = 13
    PROBE = 14
    SET_TOKEN = 15  # a freshly booted agent's one token (accepted once, before any HELLO succeeds)
    RESIZE = 20  # a PTY exec's stream: ROWS, COLS (its processes get SIGWINCH)
    PS = 21  # the background processes: one PROC each, then OK
    KILL = 22  # PID, SIGNAL: signal a running background process (no other)
    LOGS = 24  # read the app's log (ember.applog)
    IDLE_QUERY = 28  # does the guest hold itself awake, or ask to be suspended now (ember-idle)?
    TCP_CONNECT = 16  # ingress: open a relay to the guest's 127.0.0.1:PORT (SIZE: the host's initial credit)
    TCP_SEND = 17  # bytes for the relay's socket (within the agent's credit)
    TCP_SHUT = 18  # the host's half-close: shutdown(SHUT_WR) once the bytes before it are written
    TCP_CREDIT = 19  # SIZE more bytes the agent may send from the socket
    HOOK = 30  # POST /ember/v1/<HOOK_NAME> (or PATH) with HOOK_BODY to the guest's 127.0.0.1:PORT within TIMEOUT_MS
    # guest -> host
    HELLO_ACK = 64
    OK = 65
    ERROR = 66
    STDOUT = 67
    STDERR = 68
    EXIT = 69
    RDATA = 70
    REOF = 71
    STARTED = 72
    CREDIT = 73
    HELLO_NAK = 74
    PROC = 80  # one background process: PID, ARG (its command line), TIME_NS (started), RUNNING, EXIT_*
    LOGDATA = 85  # a piece of the app's log: LOG_FROM, LOG_END, SIZE (the ring's capacity), LOG_DATA
    IDLE_STATE = 90  # the answer to IDLE_QUERY: HOLD and SUSPEND_NOW, two flags
    TCP_CONNECTED = 75  # the relay is open; SIZE: the agent's window for TCP_SEND bytes
    TCP_RECV = 76  # bytes the app sent
    TCP_EOF = 77  # the app closed its sending side


GUEST_TYPES = frozenset(m for m in Msg if m >= 64)


class Tag(enum.IntEnum):
    ARG = 1
    ENV = 2
    CWD = 3
    USER = 4
    TIMEOUT_MS = 5
    PATH = 6
    MODE = 7
    TOKEN = 8
    NONCE = 9
    ENTROPY = 10
    TIME_NS = 11
    HOSTNAME = 12
    NEW_TOKEN = 13
    STDIN = 14
    SIGNAL = 15
    ERRNO = 17
    MESSAGE = 18
    EXIT_CODE = 19
    EXIT_SIGNAL = 20
    TIMED_OUT = 21
    PID = 22
    SIZE = 23
    MKDIRS = 24
    ROOT = 25  # build VMs: chroot into this directory first
    TOOL = 26  # build VMs: argv[0] is one of Ember's tools, outside the image
    PORT = 27
    HTTP = 28  # retired (PROBE once POSTed the ready hook itself; now Msg.HOOK): never reused
    LIMIT = 29  # LIST: the most entries the host takes
    TRUNCATED = 30  # REOF of a LIST: entries were left out at LIMIT
    CLOSED = 31  # CREDIT: the command closed its stdin
    PTY = 45  # EXEC: on a pseudo-terminal (stdin, stdout and stderr); no ARG = the user's login shell
    ROWS = 46  # EXEC with PTY, RESIZE: the terminal's rows (1-PTY_MAX_DIM)
    COLS = 47  # ... and columns
    DETACH = 48  # EXEC: in the background (stdio on /dev/null), tracked for PS and KILL; STARTED is the reply
    RUNNING = 49  # PROC: 1 while the process runs
    APPLOG = 50  # EXEC: this is the app; keep its output in a log ring of this many bytes
    LOG_FROM = 51  # LOGS: the offset to read from; LOGDATA: the offset its data starts at
    LOG_END = 52  # LOGDATA: every byte the app wrote (the offset after the newest)
    LOG_WAIT_MS = 53  # LOGS: wait this long for output past LOG_FROM
    LOG_DATA = 54  # LOGDATA: the bytes
    HOLD = 55  # IDLE_STATE: the guest holds itself awake (ember-idle hold)
    SUSPEND_NOW = 56  # IDLE_STATE: the guest asked to be suspended (ember-idle suspend; consumed by the answer)
    HOOK_NAME = 60  # HOOK: lowercase letters, at most 32
    HOOK_BODY = 61  # HOOK: at most HOOK_BODY_MAX bytes
    HOOK_ANSWER = 62  # OK of a HOOK: the answer's first bytes, raw (at most HOOK_ANSWER_MAX)


@dataclass(frozen=True)
class Frame:
    type: Msg
    stream: int
    payload: bytes = b""


def encode_frame(type_: Msg, stream: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), stream, int(type_)) + payload


def decode_header(raw: bytes) -> tuple[int, int, Msg]:
    """Validate a guest frame header; returns (length, stream, type)."""
    length, stream, type_ = HEADER.unpack(raw)
    if length > MAX_PAYLOAD:
        raise GuestProtocolError(f"frame of {length} bytes exceeds the {MAX_PAYLOAD} limit")
    if type_ not in GUEST_TYPES:
        raise GuestProtocolError(f"unknown guest message type {type_}")
    return length, stream, Msg(type_)


Field = tuple[Tag, bytes | str | int]


def encode_fields(fields: Iterable[Field]) -> bytes:
    out = bytearray()
    for tag, value in fields:
        if isinstance(value, bool):
            raw = b"\x01" if value else b"\x00"
        elif isinstance(value, int):
            raw = struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF)
        elif isinstance(value, str):
            raw = value.encode()
        else:
            raw = bytes(value)
        if b"\x00" in raw and tag in _STRING_TAGS:
            raise InvalidRequest(f"{tag.name.lower()} values must not contain NUL bytes (\\0)")
        out += struct.pack("<BI", int(tag), len(raw)) + raw
    return bytes(out)


_STRING_TAGS = frozenset({Tag.ARG, Tag.ENV, Tag.CWD, Tag.USER, Tag.PATH, Tag.HOSTNAME})


def decode_fields(payload: bytes) -> dict[Tag, list[bytes]]:
    fields: dict[Tag, list[bytes]] = {}
    pos = 0
    while pos < len(payload):
        if pos + 5 > len(payload):
            raise GuestProtocolError("truncated field header")
        tag, length = struct.unpack_from("<BI", payload, pos)
        pos += 5
        if length > len(payload) - pos:
            raise GuestProtocolError("field runs past the end of the frame")
        try:
            key = Tag(tag)
        except ValueError:
            raise GuestProtocolError(f"unknown field tag {tag}") from None
        fields.setdefault(key, []).append(payload[pos : pos + length])
        pos += length
    return fields


def field_int(fields: dict[Tag, list[bytes]], tag: Tag, default: int | None = None) -> int:
    values = fields.get(tag)
    if not values:
        if default is None:
            raise GuestProtocolError(f"missing field {tag.name}")
        return default
    raw = values[0]
    if len(raw) not in (1, 4, 8):
        raise GuestProtocolError(f"field {tag.name} has bad size {len(raw)}")
    return int.from_bytes(raw, "little")


def field_str(fields: dict[Tag, list[bytes]], tag: Tag, default: str = "") -> str:
    values = fields.get(tag)
    if not values:
        return default
    return values[0].decode("utf-8", errors="replace")


def hello_frames(token: str, nonce: bytes, *, first_boot: bool) -> bytes:
    """The host's side of the handshake: SET_TOKEN first for a freshly booted agent, then HELLO.
    A token is TOKEN_MIN to TOKEN_MAX bytes (the agent refuses any other as SET_TOKEN or NEW_TOKEN)."""
    if not TOKEN_MIN <= len(token.encode()) <= TOKEN_MAX:
        raise ValueError(f"an agent token is {TOKEN_MIN}-{TOKEN_MAX} bytes")
    hello = encode_frame(Msg.HELLO, 0, encode_fields([(Tag.TOKEN, token), (Tag.NONCE, nonce)]))
    return (encode_frame(Msg.SET_TOKEN, 0, encode_fields([(Tag.TOKEN, token)])) if first_boot else b"") + hello


def hello_answers(nonce: bytes) -> tuple[bytes, bytes]:
    """The agent's two possible answers to a HELLO with ``nonce``, byte for byte: (accepted, refused)."""
    return encode_frame(Msg.HELLO_ACK, 0, ACK_MAGIC + nonce), encode_frame(Msg.HELLO_NAK, 0, NAK_MAGIC + nonce)


@dataclass(frozen=True)
class DirEntry:
    name: str
    mode: int
    size: int
    mtime: int


def decode_entries(blob: bytes) -> Iterator[DirEntry]:
    """The entries of one RDATA frame of a listing, decoded as they are taken (the caller
    counts them): ``u32 name_len | mode | size | mtime | name`` records, whole in each frame.
    A name is a file name: 1 to NAME_MAX bytes, neither "." nor "..", without "/" or NUL."""
    pos = 0
    while pos < len(blob):
        if pos + 4 + ENTRY_HEADER.size > len(blob):
            raise GuestProtocolError("truncated directory entry")
        (name_len,) = struct.unpack_from("<I", blob, pos)
        mode, size, mtime = ENTRY_HEADER.unpack_from(blob, pos + 4)
        start = pos + 4 + ENTRY_HEADER.size
        if name_len > NAME_MAX or start + name_len > len(blob):
            raise GuestProtocolError("directory entry name out of bounds")
        raw = blob[start : start + name_len]
        if raw in (b"", b".", b"..") or b"/" in raw or b"\x00" in raw:
            raise GuestProtocolError(f"a directory entry name that is no file name: {raw[:20]!r}")
        yield DirEntry(name=raw.decode("utf-8", errors="replace"), mode=mode, size=size, mtime=mtime)
        pos = start + name_len
