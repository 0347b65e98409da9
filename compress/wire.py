"""Wire form of encoded KV pages: one flat byte buffer = header + tensor bytes, for the transfer
layer to send and the decode side to adopt into its own pool without conversion.

Layout: 8-byte magic+version, 4-byte header length, UTF-8 JSON header, then each tensor's raw
bytes in header order. The header names the codec, the layout version, the page count and each
tensor's name, dtype, per-page shape and byte offset, and a CRC32 of the payload.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

import torch

MAGIC = b"ZIPKV\x00\x01\x00"  # name + layout version 1
LAYOUT_VERSION = 1
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16,
    torch.float32, torch.float8_e4m3fn)}


class WireError(ValueError):
    """A buffer that is not a zipserve page batch, or one that fails its checks."""


@dataclass(frozen=True)
class WirePages:
    codec: str
    num_pages: int
    tensors: dict[str, torch.Tensor]
    """name -> [num_pages, ...] (CPU, views into the received buffer)."""
    meta: dict


def pack_pages(codec: str, store: dict[str, torch.Tensor], page_ids: torch.Tensor,
               meta: dict | None = None) -> bytes:
    """Gather pages page_ids of a codec store into one buffer."""
    parts, fields, offset = [], [], 0
    for name, t in store.items():
        sel = t[page_ids.to(t.device)].contiguous().cpu()
        raw = sel.view(torch.uint8).numpy().tobytes() if sel.numel() else b""
        fields.append({"name": name, "dtype": str(sel.dtype).removeprefix("torch."),
                       "page_shape": list(sel.shape[1:]), "offset": offset, "nbytes": len(raw)})
        parts.append(raw)
        offset += len(raw)
    payload = b"".join(parts)
    header = json.dumps({"codec": codec, "layout_version": LAYOUT_VERSION,
                         "num_pages": int(page_ids.numel()), "fields": fields,
                         "crc32": zlib.crc32(payload), "meta": meta or {}}).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + payload


def unpack_pages(buf: bytes | bytearray | memoryview) -> WirePages:
    """Parse and verify a buffer; raises WireError on a bad magic, version, size or checksum."""
    mv = memoryview(buf)
    if len(mv) < 12 or bytes(mv[:8]) != MAGIC:
        raise WireError("not a zipserve KV page buffer (bad magic or layout version)")
    (hlen,) = struct.unpack("<I", mv[8:12])
    try:
        header = json.loads(bytes(mv[12:12 + hlen]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WireError(f"corrupt header: {e}") from e
    payload = mv[12 + hlen:]
    expect = sum(f["nbytes"] for f in header["fields"])
    if len(payload) != expect:
        raise WireError(f"payload is {len(payload)} bytes, header says {expect}")
    if zlib.crc32(payload) != header["crc32"]:
        raise WireError("checksum mismatch: the pages were corrupted in transit")
    n = header["num_pages"]
    tensors = {}
    for f in header["fields"]:
        dtype = DTYPES.get(f["dtype"])
        if dtype is None:
            raise WireError(f"unknown dtype {f['dtype']!r} for {f['name']}")
        raw = payload[f["offset"]:f["offset"] + f["nbytes"]]
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if f["nbytes"] else \
            torch.empty(0, dtype=torch.uint8)
        tensors[f["name"]] = flat.view(dtype).view(n, *f["page_shape"])
    return WirePages(header["codec"], n, tensors, header.get("meta", {}))


def check_layout(pages: WirePages, codec: str, store: dict[str, torch.Tensor],
                 note: str = "") -> None:
    """WireError unless `pages` are `codec`'s and carry the fields, dtypes and per-page shapes of
    `store` (a store of that codec; only its fields' dtypes and shapes past the first dim count).
    `note` is appended to a codec mismatch's message."""
    if pages.codec != codec:
        raise WireError(f"pages are {pages.codec!r}, this pool holds {codec!r}{note}")
    if set(pages.tensors) != set(store):
        raise WireError(f"fields {sorted(pages.tensors)} do not match the pool's {sorted(store)}")
    for name, t in store.items():
        src = pages.tensors[name]
        if src.dtype != t.dtype or tuple(src.shape[1:]) != tuple(t.shape[1:]):
            raise WireError(f"{name}: {src.dtype} {tuple(src.shape[1:])} per page, pool has "
                            f"{t.dtype} {tuple(t.shape[1:])}")


def adopt_pages(codec: str, store: dict[str, torch.Tensor], page_ids: torch.Tensor,
                pages: WirePages) -> None:
    """Write received pages into pool pages page_ids of a store of the same codec and layout."""
    check_layout(pages, codec, store)
    if pages.num_pages != page_ids.numel():
        raise WireError(f"{pages.num_pages} pages received for {page_ids.numel()} reserved")
    for name, t in store.items():
        t[page_ids.to(t.device)] = pages.tensors[name].to(t.device)
