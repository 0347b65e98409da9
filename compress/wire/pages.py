"""ZIPKV: encoded KV pages of one layer as one flat host buffer, for the transfer layer to send and
the decode side to adopt into its own pool without conversion.

Framed as every message (framing.py); the header names the codec, the layout version, the page
count, each tensor's name, dtype, per-page shape and byte offset, and the CRC32 of the body; the
body is each tensor's raw bytes in header order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zipserve.compress.device_copy import index_on
from zipserve.compress.wire.checksum import host_checksum
from zipserve.compress.wire.errors import ChecksumError, FormatError, LayoutError
from zipserve.compress.wire.framing import (
    PAGES,
    dtype_name,
    dtype_of,
    frame,
    raw_bytes,
    tensor_from,
    unframe,
)

LAYOUT_VERSION = 1
"""Version of the page layouts a header describes (device_pages.py states it too)."""


@dataclass(frozen=True)
class WirePages:
    codec: str
    num_pages: int
    tensors: dict[str, torch.Tensor]
    """name -> [num_pages, ...] (views into the received buffer: host, or the device payload)."""
    meta: dict


def pack_pages(
    codec: str, store: dict[str, torch.Tensor], page_ids: torch.Tensor, meta: dict | None = None
) -> bytes:
    """Gather pages page_ids of a codec store into one buffer."""
    parts, fields, offset = [], [], 0
    for name, t in store.items():
        sel = t[page_ids.to(t.device)]  # [n, ...]
        raw = raw_bytes(sel)
        fields.append(
            {
                "name": name,
                "dtype": dtype_name(sel.dtype),
                "page_shape": list(sel.shape[1:]),
                "offset": offset,
                "nbytes": len(raw),
            }
        )
        parts.append(raw)
        offset += len(raw)
    payload = b"".join(parts)
    return frame(
        PAGES,
        {
            "codec": codec,
            "layout_version": LAYOUT_VERSION,
            "num_pages": int(page_ids.numel()),
            "fields": fields,
            "crc32": host_checksum(payload),
            "meta": meta or {},
        },
        payload,
    )


def unpack_pages(buf: bytes | bytearray | memoryview) -> WirePages:
    """Parse and verify a buffer: FormatError on a bad magic, version, header, size or dtype,
    ChecksumError when the body is not what was sent."""
    f = unframe(buf, PAGES)
    header, payload = f.header, f.body
    try:
        fields, n = header["fields"], header["num_pages"]
        expect = sum(x["nbytes"] for x in fields)
    except (KeyError, TypeError) as e:
        raise FormatError(f"corrupt header: missing {e}") from e
    if header.get("layout_version") != LAYOUT_VERSION:
        raise FormatError(
            f"layout version {header.get('layout_version')!r}, this side reads {LAYOUT_VERSION}"
        )
    if len(payload) != expect:
        raise FormatError(f"payload is {len(payload)} bytes, header says {expect}")
    if host_checksum(payload) != header.get("crc32"):
        raise ChecksumError("checksum mismatch: the pages were corrupted in transit")
    tensors = {}
    for x in fields:
        dtype = dtype_of(x["dtype"], x["name"])
        raw = payload[x["offset"] : x["offset"] + x["nbytes"]]
        tensors[x["name"]] = tensor_from(raw, dtype, [n, *x["page_shape"]])
    return WirePages(header["codec"], n, tensors, header.get("meta", {}))


def check_layout(
    pages: WirePages, codec: str, store: dict[str, torch.Tensor], note: str = ""
) -> None:
    """LayoutError unless `pages` are `codec`'s and carry the fields, dtypes and per-page shapes
    of `store` (a store of that codec; only its fields' dtypes and shapes past the first dim
    count). `note` is appended to a codec mismatch's message."""
    if pages.codec != codec:
        raise LayoutError(f"pages are {pages.codec!r}, this pool holds {codec!r}{note}")
    check_fields(pages.tensors, store)


def check_fields(tensors: dict[str, torch.Tensor], store: dict[str, torch.Tensor]) -> None:
    """LayoutError unless `tensors` has `store`'s fields with their dtypes and per-page shapes."""
    if set(tensors) != set(store):
        raise LayoutError(f"fields {sorted(tensors)} do not match the pool's {sorted(store)}")
    for name, t in store.items():
        src = tensors[name]
        if src.dtype != t.dtype or tuple(src.shape[1:]) != tuple(t.shape[1:]):
            raise LayoutError(
                f"{name}: {src.dtype} {tuple(src.shape[1:])} per page, pool has "
                f"{t.dtype} {tuple(t.shape[1:])}"
            )


def adopt_pages(
    codec: str, store: dict[str, torch.Tensor], page_ids: torch.Tensor, pages: WirePages
) -> None:
    """Write received pages into pool pages page_ids of a store of the same codec and layout
    (the ids go to the store's device once, without a synchronization)."""
    check_layout(pages, codec, store)
    if pages.num_pages != page_ids.numel():
        raise LayoutError(f"{pages.num_pages} pages received for {page_ids.numel()} reserved")
    if not store:
        return
    ids = index_on(page_ids, next(iter(store.values())).device)  # [n]
    for name, t in store.items():
        t[ids] = pages.tensors[name].to(t.device)
