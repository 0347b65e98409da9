"""One sequence's KV, one layer at a time, out of a cache and into another (prefill -> decode).

A `LayerKV` is what travels for a layer: the sequence's encoded full pages in the wire form of
compress/wire.py, plus (compressed caches) its 16-bit open page and sinks. The decode side writes
them into pages and a slot it reserved beforehand; page ids need not match.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import torch

from zipserve.compress.compressed_cache import CompressedKVCache
from zipserve.compress.wire import DTYPES, WirePages, adopt_pages, pack_pages, unpack_pages
from zipserve.engine.kv_cache import KVCache
from zipserve.engine.page_pool import pages_for
from zipserve.engine.sequence import Sequence


@dataclass
class LayerKV:
    layer: int
    num_tokens: int
    """Tokens of the sequence whose KV this is."""
    pages: bytes
    """compress.wire buffer: the encoded full pages (all pages for the dense bf16 cache)."""
    tail: dict[str, torch.Tensor] = field(default_factory=dict)
    """open_k/open_v [KVH, r, D], sink_k/sink_v [KVH, s, D] (16-bit, CPU); empty for bf16."""
    request_id: str = ""

    def nbytes(self) -> int:
        return len(self.pages) + sum(t.numel() * t.element_size() for t in self.tail.values())

    def to_bytes(self) -> bytes:
        """Everything in one buffer (no pickle): magic, JSON header, pages, raw tail tensors."""
        tail = {name: t.contiguous().cpu() for name, t in self.tail.items()}
        header = json.dumps({
            "layer": self.layer, "num_tokens": self.num_tokens, "request_id": self.request_id,
            "pages_nbytes": len(self.pages),
            "tail": [{"name": n, "dtype": str(t.dtype).removeprefix("torch."),
                      "shape": list(t.shape)} for n, t in tail.items()]}).encode()
        parts = [_MAGIC, struct.pack("<I", len(header)), header, self.pages]
        parts += [t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
                  for t in tail.values()]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> "LayerKV":
        """Parse to_bytes output; ValueError on anything else."""
        if data[:len(_MAGIC)] != _MAGIC:
            raise ValueError("not a zipserve LayerKV buffer")
        (hlen,) = struct.unpack("<I", data[len(_MAGIC):len(_MAGIC) + 4])
        pos = len(_MAGIC) + 4
        h = json.loads(data[pos:pos + hlen])
        pos += hlen
        pages = data[pos:pos + h["pages_nbytes"]]
        pos += h["pages_nbytes"]
        tail = {}
        for f in h["tail"]:
            dtype = DTYPES[f["dtype"]]
            n = math.prod(f["shape"]) * torch.empty((), dtype=dtype).element_size()
            raw = bytearray(data[pos:pos + n])
            if len(raw) != n:
                raise ValueError(f"LayerKV buffer truncated in tail tensor {f['name']}")
            t = torch.frombuffer(raw, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
            tail[f["name"]] = t.view(dtype).view(f["shape"])
            pos += n
        return cls(h["layer"], h["num_tokens"], pages, tail, h["request_id"])


_MAGIC = b"ZKVL\x01"


def _codec_name(cache) -> str:
    return "bf16" if isinstance(cache, KVCache) else cache.codec.name


def _store(cache, layer: int) -> dict[str, torch.Tensor]:
    if isinstance(cache, KVCache):
        k, v = cache.layer(layer)
        return {"k": k, "v": v}
    return cache.stores[layer]


def export_layer(cache: KVCache | CompressedKVCache, layer: int, seq: Sequence,
                 num_tokens: int | None = None) -> LayerKV:
    """The first num_tokens (default: seq.num_cached) tokens' KV of one layer."""
    n, p = (seq.num_cached if num_tokens is None else num_tokens), cache.page_size
    if isinstance(cache, KVCache):
        ids = seq.pages[:pages_for(n, p)]
        return LayerKV(layer, n, pack_pages("bf16", _store(cache, layer), torch.tensor(ids)),
                       request_id=seq.request_id)
    n_full = n // p
    ids = torch.tensor(seq.pages[:n_full], dtype=torch.long)
    r, s = n - n_full * p, min(cache.n_sink, n)
    open_k, open_v = cache.open[layer, 0, seq.slot], cache.open[layer, 1, seq.slot]
    tail = {"open_k": open_k[:, :r].cpu().clone(), "open_v": open_v[:, :r].cpu().clone()}
    if cache.n_sink:
        tail["sink_k"] = cache.sinks[layer, 0, seq.slot, :, :s].cpu().clone()
        tail["sink_v"] = cache.sinks[layer, 1, seq.slot, :, :s].cpu().clone()
    return LayerKV(layer, n, pack_pages(cache.codec.name, cache.stores[layer], ids), tail,
                   seq.request_id)


def import_layer(cache: KVCache | CompressedKVCache, kv: LayerKV, seq: Sequence) -> None:
    """Write a received layer into seq's reserved pages (and slot). Raises ValueError (WireError)
    when the pages are corrupt or of another codec/layout."""
    wire: WirePages = unpack_pages(kv.pages)
    store = _store(cache, kv.layer)
    ids = torch.tensor(seq.pages[:wire.num_pages], dtype=torch.long)
    if len(ids) != wire.num_pages:
        raise ValueError(f"layer {kv.layer}: {wire.num_pages} pages arrived for "
                         f"{len(seq.pages)} reserved")
    adopt_pages(_codec_name(cache), store, ids, wire)
    if isinstance(cache, CompressedKVCache):
        dev = cache.open.device
        r = kv.tail["open_k"].shape[1]
        cache.open[kv.layer, 0, seq.slot, :, :r] = kv.tail["open_k"].to(dev)
        cache.open[kv.layer, 1, seq.slot, :, :r] = kv.tail["open_v"].to(dev)
        if cache.n_sink:
            s = kv.tail["sink_k"].shape[1]
            cache.sinks[kv.layer, 0, seq.slot, :, :s] = kv.tail["sink_k"].to(dev)
            cache.sinks[kv.layer, 1, seq.slot, :, :s] = kv.tail["sink_v"].to(dev)
