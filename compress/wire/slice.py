"""ZKVS: one rank's slice of one layer, as a prefill group's member sends it to the decode worker.

`SliceKV` is what a rank computed (prefill_group/slices.py encodes it and joins N of them into the
LayerKV a single prefill worker would have sent); `slice_to_bytes` frames it with where it sits in
the prompt and how many slices make the layer, over the same pages + tail body as a ZKVL message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zipserve.compress.wire.errors import FormatError
from zipserve.compress.wire.framing import SLICE, frame, unframe
from zipserve.compress.wire.layer import body_fields, read_body


@dataclass
class SliceKV:
    layer: int
    rank: int
    start: int
    """First token of the slice (a multiple of page_size)."""
    num_tokens: int
    """Tokens in this slice."""
    total_tokens: int
    """Tokens in the whole prompt."""
    codec: str
    pages: bytes
    """ZIPKV buffer (pages.py): the slice's full pages, encoded (bf16: as they are)."""
    tail: dict[str, torch.Tensor] = field(default_factory=dict)
    """Last rank: open_k/open_v [KVH, r, D] (bf16: only when r > 0); first rank of a codec with
    sinks: sink_k/sink_v [KVH, s, D] (16-bit)."""

    def nbytes(self) -> int:
        return len(self.pages) + sum(t.numel() * t.element_size() for t in self.tail.values())


@dataclass(frozen=True)
class SliceMessage:
    """A received slice, with the request it belongs to and how many slices make its layer."""

    kv: SliceKV
    request_id: str
    n_ranks: int


def slice_to_bytes(s: SliceKV, request_id: str, n_ranks: int) -> bytes:
    """One ZKVS message (no pickle)."""
    fields, body = body_fields(s.pages, s.tail)
    return frame(
        SLICE,
        {
            "layer": s.layer,
            "rank": s.rank,
            "start": s.start,
            "num_tokens": s.num_tokens,
            "total_tokens": s.total_tokens,
            "codec": s.codec,
            "request_id": request_id,
            "n_ranks": n_ranks,
            **fields,
        },
        *body,
    )


def slice_from_bytes(data: bytes | bytearray | memoryview) -> SliceMessage:
    """Parse slice_to_bytes output; FormatError on anything else."""
    f = unframe(data, SLICE)
    pages, tail = read_body(f.header, f.body, "KV slice buffer")
    h = f.header
    try:
        kv = SliceKV(
            h["layer"],
            h["rank"],
            h["start"],
            h["num_tokens"],
            h["total_tokens"],
            h["codec"],
            pages,
            tail,
        )
        return SliceMessage(kv, h["request_id"], h["n_ranks"])
    except KeyError as e:
        raise FormatError(f"unreadable KV slice buffer: missing {e}") from e
