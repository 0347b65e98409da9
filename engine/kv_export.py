"""One sequence's KV, one layer at a time, out of a cache and into another (prefill -> decode).

What travels for a layer is a wire message (compress/wire/layer.py): the sequence's full pages in
the layer's codec's form plus the 16-bit tokens beside them (the partly filled page, a codec's
sinks), as the cache hands them out (`PagedKVCache.export_pages`). The decode side writes them into
pages and a slot it reserved beforehand (`import_pages`); page ids need not match.

Two forms: `LayerKV` (host bytes, CRC32; any transport) and `DeviceLayerKV` (one flat buffer left
on the device plus a small header with a device-computed checksum; for channels that carry device
tensors: in-process, CUDA IPC, NCCL). `export_layer(..., device_form=True)` makes the second;
`import_layer` takes either and writes device-to-device for the second.

Delta transfer: a receiver whose reservation starts with `held` pages from its own prefix cache
(engine/prefix_cache.py: the same chained hashes, so the same tokens and everything before them)
needs only the pages after them. `export_layer(..., first_page=k)` leaves the first k full pages
and the sinks out (the receiver holds those with its first cached page: in page 0, or as the
chain's saved prefix state) and says so in the message's `first_page`; `import_layer(..., held)`
writes the pages from index `held` on (skipping any it was sent but holds already) and leaves the
held pages and the slot's sinks as they are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from zipserve.compress.wire import (
    DeviceLayerKV,
    FormatError,
    LayerKV,
    WirePages,
    pack_device,
    pack_pages,
    unpack_device,
    unpack_pages,
)
from zipserve.engine.device_import import device_import_on, import_device
from zipserve.engine.paged_cache import LayerPages, PagedKVCache
from zipserve.engine.sequence import Sequence

SINK_KEYS = ("sink_k", "sink_v")


def export_layer(
    cache: PagedKVCache,
    layer: int,
    seq: Sequence,
    num_tokens: int | None = None,
    device_form: bool = False,
    first_page: int = 0,
) -> LayerKV | DeviceLayerKV:
    """The first num_tokens (default: seq.num_cached) tokens' KV of one layer, without the first
    `first_page` full pages (and then without the sinks); device_form: as a DeviceLayerKV on the
    cache's device (nothing synchronizes or touches the host). ValueError when the cache cannot
    send what it holds (decode_kv=dense) or first_page is past the full pages."""
    n = seq.num_cached if num_tokens is None else num_tokens
    out = _delta(cache.export_pages(layer, seq, n), first_page)
    if device_form:
        return _export_device(out, layer, seq, n, first_page)
    tail = {k: t.cpu().clone() for k, t in out.tail.items()}
    return LayerKV(
        layer,
        n,
        pack_pages(out.codec, out.store, out.page_ids),
        tail,
        seq.request_id,
        first_page,
    )


def held_nbytes(cache: PagedKVCache, layer: int, seq: Sequence, num_tokens: int, held: int) -> int:
    """Wire bytes of what `export_layer(..., first_page=held)` leaves out of a layer: the first
    `held` full pages in the codec's form, and the sinks."""
    if not held:
        return 0
    out = cache.export_pages(layer, seq, num_tokens)
    per_page = sum(t[0].numel() * t.element_size() for t in out.store.values())
    sinks = sum(
        out.tail[k].numel() * out.tail[k].element_size() for k in SINK_KEYS if k in out.tail
    )
    return held * per_page + sinks


def _delta(out: LayerPages, first_page: int) -> LayerPages:
    if not first_page:
        return out
    if not 0 < first_page <= len(out.page_ids):
        raise ValueError(
            f"first_page: {first_page} is outside the sequence's {len(out.page_ids)} full pages"
        )
    tail = {k: t for k, t in out.tail.items() if k not in SINK_KEYS}
    return dataclasses.replace(out, page_ids=out.page_ids[first_page:], tail=tail)


def _export_device(
    out: LayerPages, layer: int, seq: Sequence, n: int, first_page: int
) -> DeviceLayerKV:
    wire = pack_device(out.codec, out.store, out.page_ids, extras=out.tail)
    ready = None
    if wire.payload.is_cuda:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(wire.payload.device))
    return DeviceLayerKV(layer, n, wire, seq.request_id, ready, first_page=first_page)


@dataclass(frozen=True)
class PageSpan:
    """The part of a reserved sequence a delta writes: what `import_pages` reads of a Sequence
    (its pages, slot and token count), from its first page not held on."""

    pages: list[int]
    slot: int
    num_tokens: int


def import_layer(
    cache: PagedKVCache, kv: LayerKV | DeviceLayerKV, seq: Sequence, held: int = 0
) -> None:
    """Write a received layer into seq's reserved pages (and slot), from page `held` on (the
    pages before it are seq's own cached ones). Raises the wire's typed errors (ValueErrors):
    ChecksumError when the pages changed on the way, FormatError / LayoutError when they are
    malformed or of another codec/layout, ValueError when pages the reservation does not hold
    are missing or the page count does not fit the sequence. A dense-mode cache
    (decode_kv=dense) takes its codec's wire form and dequantizes it on the way in."""
    p = cache.page_size
    if isinstance(kv, DeviceLayerKV):
        kv.check()
        kv.wait_ready()  # this stream reads the payload after the sender's writes (CUDA IPC)
        header = kv.wire.header
        _check_span(kv, header.get("num_pages"), held, p)
        if (
            not held
            and device_import_on()
            and import_device(cache, kv.layer, header, kv.wire.payload, seq)
        ):
            return
        wire, tail = unpack_device(header, kv.wire.payload, verify=False)
    else:
        wire, tail = unpack_pages(kv.pages), kv.tail
        _check_span(kv, wire.num_pages, held, p)
    if not held:
        cache.import_pages(kv.layer, wire, tail, seq)
        return
    wire = _drop_pages(wire, held - kv.first_page)
    if "open_k" in tail and "open_v" in tail:  # the sinks are held: write none of them
        tail = {k: t for k, t in tail.items() if k not in SINK_KEYS}
        tail["sink_k"], tail["sink_v"] = tail["open_k"][:, :0], tail["open_v"][:, :0]
    span = PageSpan(seq.pages[held:], seq.slot, seq.num_tokens - held * p)
    cache.import_pages(kv.layer, wire, tail, span)  # type: ignore[arg-type]


def _check_span(kv: LayerKV | DeviceLayerKV, num_pages, held: int, page_size: int) -> None:
    """ValueError unless kv's pages start within the `held` cached ones and end at the
    sequence's last full page; FormatError when the page count is not a count."""
    if not isinstance(num_pages, int):
        raise FormatError(f"layer {kv.layer}: num_pages {num_pages!r} is not a page count")
    full = kv.num_tokens // page_size
    if kv.first_page > held:
        raise ValueError(
            f"layer {kv.layer}: KV from page {kv.first_page} on, but the reservation holds only "
            f"{held} cached pages"
        )
    if kv.first_page + num_pages != full:
        raise ValueError(
            f"layer {kv.layer}: pages {kv.first_page}..{kv.first_page + num_pages} arrived "
            f"for a sequence of {full} full pages"
        )


def _drop_pages(wire: WirePages, n: int) -> WirePages:
    """wire without its first n pages (the receiver holds them already)."""
    if not n:
        return wire
    return dataclasses.replace(
        wire, num_pages=wire.num_pages - n, tensors={k: t[n:] for k, t in wire.tensors.items()}
    )
