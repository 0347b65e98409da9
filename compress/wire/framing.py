"""How every KV message is framed, and the magic that names each format.

A message is: a magic naming the format and its version, the length of the header as a
little-endian uint32, the header (UTF-8 JSON), then the body (raw tensor bytes, in the order the
header lists them). The formats:

    ZIPKV  encoded pages of one layer (pages.py)            host bytes, CRC32 of the body
    ZKVL   one layer of one sequence, host form (layer.py)  a ZIPKV buffer + the 16-bit tail
    ZKVD   one layer, device form: its header (layer.py)    the payload follows as a 2nd message
    ZKVS   one rank's slice of one layer (slice.py)         a prefill group's share of a ZKVL

No magic is a prefix of another, so the first bytes name the format (`format_of`).

(The transport frames each message again in its own channel header, transfer/channel.py "ZKV1":
that is channel framing, not a KV format.)
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch

from zipserve.compress.wire.errors import FormatError

PAGES = b"ZIPKV\x00\x01\x00"  # name + layout version 1
LAYER = b"ZKVL\x01"
DEVICE_HEADER = b"ZKVD\x01"
SLICE = b"ZKVS\x01"
FORMATS = {
    PAGES: "KV page buffer",
    LAYER: "LayerKV message",
    DEVICE_HEADER: "device LayerKV header",
    SLICE: "KV slice buffer",
}
"""magic -> what a message of that format is called in errors."""

DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float8_e4m3fn,
    )
}
"""The tensor dtypes a message may carry, by the name its header gives."""


@dataclass(frozen=True)
class Frame:
    magic: bytes
    header: dict
    body: memoryview
    """Everything after the header (views into the received buffer)."""


def frame(magic: bytes, header: dict, *body: bytes) -> bytes:
    """One message: magic, header length, JSON header, body parts."""
    h = json.dumps(header).encode()
    return b"".join((magic, struct.pack("<I", len(h)), h, *body))


def format_of(data: bytes | bytearray | memoryview) -> bytes | None:
    """The magic `data` starts with, None when it starts with none of them."""
    mv = memoryview(data)
    return next((m for m in FORMATS if bytes(mv[: len(m)]) == m), None)


def unframe(data: bytes | bytearray | memoryview, magic: bytes) -> Frame:
    """Split a message of format `magic` into its header and body; FormatError for anything
    else (another magic or version, a header that is cut short or not a JSON object)."""
    mv, n = memoryview(data), len(magic)
    if len(mv) < n + 4 or bytes(mv[:n]) != magic:
        raise FormatError(f"not a zipserve {FORMATS[magic]} (bad magic or version)")
    (hlen,) = struct.unpack("<I", mv[n : n + 4])
    start = n + 4
    if len(mv) < start + hlen:
        raise FormatError(f"{FORMATS[magic]} truncated in its header")
    try:
        header = json.loads(bytes(mv[start : start + hlen]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"corrupt header: {e}") from e
    if not isinstance(header, dict):
        raise FormatError(f"corrupt header: {FORMATS[magic]} header is not an object")
    return Frame(magic, header, mv[start + hlen :])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str, what: str) -> torch.dtype:
    """The dtype a header names; FormatError for one the wire does not carry."""
    dtype = DTYPES.get(name)
    if dtype is None:
        raise FormatError(f"unknown dtype {name!r} for {what}")
    return dtype


def raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes as they sit in memory (on the host)."""
    t = t.contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensor_from(raw: memoryview | bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A host tensor of `shape` over a copy of `raw` (exactly its bytes)."""
    if not len(raw):
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).view(shape)


def nbytes_of(dtype: torch.dtype, shape: list[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
