"""Each rank's KV for the decode side, and the decode side's assembly of N of them.

A rank's slice starts on a page boundary and (except the last rank's) ends on one, so it encodes
whole pages of its own tokens with the request's codec exactly as a single prefill worker would
encode the same pages (every codec quantizes page by page). `export_slice` makes one layer of one
slice, a `SliceKV` (compress/wire/slice.py: its wire form, ZKVS, framed as every KV message);
`assemble_layer` joins the N slices of a layer into the `LayerKV` a single prefill worker would
have exported (engine/kv_export.py), so the decode worker's existing `import_layer` takes it
unchanged. `SliceAssembler` is the decode worker's buffer that joins them as they arrive from N
senders.
"""

from __future__ import annotations

import torch

from zipserve.compress.codec import KVCodec
from zipserve.compress.wire import LayerKV, SliceKV, pack_pages, slice_from_bytes, unpack_pages


def _as_pages(x: torch.Tensor, p: int) -> torch.Tensor:
    """[n*P, KVH, D] -> [n, KVH, P, D]."""
    return x.reshape(-1, p, x.shape[1], x.shape[2]).transpose(1, 2).contiguous()


def export_slice(
    codec: KVCodec,
    codec_name: str,
    layer: int,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    total_tokens: int,
    page_size: int,
    rank: int,
) -> SliceKV:
    """One layer of one rank's slice. k, v: [t, KVH, D] post-RoPE, in the model's dtype;
    codec: that layer's codec (bf16: the dense codec, its pages in the model's dtype)."""
    p, t = page_size, k.shape[0]
    if start % p:
        raise ValueError(f"slice of rank {rank} starts at {start}, not on a page boundary")
    last = start + t == total_tokens
    if not last and t % p:
        raise ValueError(f"slice of rank {rank} ({t} tokens) is not whole pages")
    nf = t // p  # whole pages; the last rank's partial page travels as its valid tokens
    store = codec.new_store(nf, k.device)
    if nf:
        codec.encode(
            store,
            torch.arange(nf, device=k.device),
            _as_pages(k[: nf * p], p),
            _as_pages(v[: nf * p], p),
        )  # [nf, KVH, P, D] each
    tail: dict[str, torch.Tensor] = {}
    # The tail travels in the form the decode side's 16-bit open page and sinks keep (the
    # codec's to_dense: lowrank keeps V in its completed basis; every other codec as it is).
    kd, vd = codec.to_dense(k, v)  # [t, KVH, D]
    # as the engine's caches export (engine/paged_cache.py): dense pages send a partly filled
    # page only when there is one, a codec's open page always travels
    if last and (not codec.dense_pages or t > nf * p):
        tail["open_k"] = kd[nf * p :].transpose(0, 1).cpu().clone()  # [KVH, r, D]
        tail["open_v"] = vd[nf * p :].transpose(0, 1).cpu().clone()
    if start == 0 and codec.n_sink:
        s = min(codec.n_sink, t)
        tail["sink_k"] = kd[:s].transpose(0, 1).cpu().clone()  # [KVH, s, D]
        tail["sink_v"] = vd[:s].transpose(0, 1).cpu().clone()
    return SliceKV(
        layer,
        rank,
        start,
        t,
        total_tokens,
        codec_name,
        pack_pages(codec_name, store, torch.arange(nf)),
        tail,
    )


def assemble_layer(parts: list[SliceKV], request_id: str = "") -> LayerKV:
    """The N slices of one layer (any order) -> one LayerKV over the whole prompt. Raises
    ValueError when they are of different layers/codecs or do not tile [0, total) in order."""
    if not parts:
        raise ValueError("assemble: no slices")
    parts = sorted(parts, key=lambda s: s.start)
    first, total = parts[0], parts[0].total_tokens
    pos = 0
    for s in parts:
        if (s.layer, s.codec, s.total_tokens) != (first.layer, first.codec, total):
            raise ValueError(
                f"assemble: slice of rank {s.rank} is layer {s.layer} codec "
                f"{s.codec} of {s.total_tokens} tokens; rank {first.rank}'s is layer "
                f"{first.layer} codec {first.codec} of {total}"
            )
        if s.start != pos:
            raise ValueError(
                f"assemble: slice of rank {s.rank} starts at {s.start}, expected {pos}"
            )
        pos += s.num_tokens
    if pos != total:
        raise ValueError(f"assemble: slices cover {pos} of {total} tokens")
    wires = [unpack_pages(s.pages) for s in parts]
    names = list(wires[0].tensors)
    store = {m: torch.cat([w.tensors[m] for w in wires]) for m in names}
    n_pages = sum(w.num_pages for w in wires)
    tail: dict[str, torch.Tensor] = {}
    if "open_k" in parts[-1].tail:  # bf16 has none when the prompt is whole pages
        tail["open_k"], tail["open_v"] = parts[-1].tail["open_k"], parts[-1].tail["open_v"]
    if "sink_k" in first.tail:
        tail["sink_k"], tail["sink_v"] = first.tail["sink_k"], first.tail["sink_v"]
    return LayerKV(
        first.layer, total, pack_pages(first.codec, store, torch.arange(n_pages)), tail, request_id
    )


class SliceAssembler:
    """Decode side: collects the slices of each (request, layer) as they arrive from the N
    ranks and hands out the assembled LayerKV once all N are in. `drop` forgets a request
    (abort/finish) so partial layers never pile up."""

    def __init__(self):
        self._parts: dict[tuple[str, int], list[SliceKV]] = {}

    def add(self, data: bytes, accept=None) -> LayerKV | None:
        """accept(request_id) -> bool: False drops the slice unbuffered (request gone). WireError
        (a ValueError) for a message that is not a readable slice."""
        msg = slice_from_bytes(data)
        s, rid, n = msg.kv, msg.request_id, msg.n_ranks
        if accept is not None and not accept(rid):
            return None
        parts = self._parts.setdefault((rid, s.layer), [])
        if any(p.rank == s.rank for p in parts):
            raise ValueError(f"layer {s.layer}: slice of rank {s.rank} arrived twice")
        parts.append(s)
        if len(parts) < n:
            return None
        del self._parts[(rid, s.layer)]
        return assemble_layer(parts, rid)

    def drop(self, request_id: str) -> None:
        for key in [k for k in self._parts if k[0] == request_id]:
            del self._parts[key]

    def pending(self) -> int:
        """(request, layer) pairs with some but not all slices."""
        return len(self._parts)
