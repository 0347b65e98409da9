"""One sequence's KV, one layer at a time, out of a cache and into another (prefill -> decode).

What travels for a layer is a wire message (compress/wire/layer.py): the sequence's full pages in
the layer's codec's form plus the 16-bit tokens beside them (the partly filled page, a codec's
sinks), as the cache hands them out (`PagedKVCache.export_pages`). The decode side writes them into
pages and a slot it reserved beforehand (`import_pages`); page ids need not match.

Two forms: `LayerKV` (host bytes, CRC32; any transport) and `DeviceLayerKV` (one flat buffer left
on the device plus a small header with a device-computed checksum; for channels that carry device
tensors: in-process, CUDA IPC, NCCL). `export_layer(..., device_form=True)` makes the second;
`import_layer` takes either and writes device-to-device for the second.
"""

from __future__ import annotations

import torch

from zipserve.compress.wire import (
    DeviceLayerKV,
    LayerKV,
    pack_device,
    pack_pages,
    unpack_device,
    unpack_pages,
)
from zipserve.engine.paged_cache import LayerPages, PagedKVCache
from zipserve.engine.sequence import Sequence


def export_layer(
    cache: PagedKVCache,
    layer: int,
    seq: Sequence,
    num_tokens: int | None = None,
    device_form: bool = False,
) -> LayerKV | DeviceLayerKV:
    """The first num_tokens (default: seq.num_cached) tokens' KV of one layer; device_form: as a
    DeviceLayerKV on the cache's device (nothing synchronizes or touches the host). ValueError
    when the cache cannot send what it holds (decode_kv=dense)."""
    n = seq.num_cached if num_tokens is None else num_tokens
    out = cache.export_pages(layer, seq, n)
    if device_form:
        return _export_device(out, layer, seq, n)
    tail = {k: t.cpu().clone() for k, t in out.tail.items()}
    return LayerKV(layer, n, pack_pages(out.codec, out.store, out.page_ids), tail, seq.request_id)


def _export_device(out: LayerPages, layer: int, seq: Sequence, n: int) -> DeviceLayerKV:
    wire = pack_device(out.codec, out.store, out.page_ids, extras=out.tail)
    ready = None
    if wire.payload.is_cuda:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(wire.payload.device))
    return DeviceLayerKV(layer, n, wire, seq.request_id, ready)


def import_layer(cache: PagedKVCache, kv: LayerKV | DeviceLayerKV, seq: Sequence) -> None:
    """Write a received layer into seq's reserved pages (and slot). Raises the wire's typed
    errors (ValueErrors): ChecksumError when the pages changed on the way, FormatError /
    LayoutError when they are malformed or of another codec/layout. A dense-mode cache
    (decode_kv=dense) takes its codec's wire form and dequantizes it on the way in."""
    if isinstance(kv, DeviceLayerKV):
        kv.check()
        wire, tail = unpack_device(kv.wire.header, kv.wire.payload, verify=False)
    else:
        wire, tail = unpack_pages(kv.pages), kv.tail
    cache.import_pages(kv.layer, wire, tail, seq)
