"""A received device-form layer written into a cache as one copy launch (kernels/row_copy.py).

`import_layer` (engine/kv_export.py) used to view the payload as pages and tails
(`unpack_device`) and let the cache write each tensor (`import_pages`): for a HACK layer ~70
Python-level torch calls and a dozen kernels, each call a chance for the decode worker's other
threads to take the GIL from its step loop (session 27, H200: 2.8 ms a layer against 0.4-0.7 ms
for bf16). Here the header alone says where each field and tail lies in the payload, the cache's
layout says where it goes, and one `copy_rows` writes them all. Same checks, same errors, same
bytes as `import_pages` (tests/test_device_import.py compares them).

Takes the caches that hold what the wire carries: `KVCache` (bf16 pages) and
`CompressedKVCache` (codes); a dense-mode cache dequantizes on the way in and a tail of another
dtype needs a cast, so those go through `import_pages` (`import_device` returns False), as does
every layer when `ZIPSERVE_DEVICE_IMPORT=0`.
"""

from __future__ import annotations

import os

import torch

from zipserve.compress.compressed_cache import CompressedKVCache
from zipserve.compress.wire import ExtraSpec, LayoutError, device_extras, device_page_fields
from zipserve.engine.kv_cache import KVCache, check_open_tail
from zipserve.engine.sequence import Sequence
from zipserve.kernels.row_copy import RowCopy, copy_rows, copy_rows_ref

TAIL_KEYS = ("open_k", "open_v", "sink_k", "sink_v")
DEVICE_IMPORT_ENV = "ZIPSERVE_DEVICE_IMPORT"


def device_import_on() -> bool:
    """`ZIPSERVE_DEVICE_IMPORT=0` sends every device-form layer through `import_pages` (an A/B
    switch for the runbook); on by default."""
    return os.environ.get(DEVICE_IMPORT_ENV, "1") != "0"


def import_device(cache, layer: int, header: dict, payload: torch.Tensor, seq: Sequence) -> bool:
    """Write a device-form layer (all its pages: nothing held) into seq's reserved pages and
    slot with one copy; False (nothing written) when this cache or the tail's dtype needs
    `import_pages`. Raises what `import_pages` raises for the same message."""
    # a subclass with its own import_pages (DenseCodecKVCache: dequantizes) keeps it
    if type(cache).import_pages is CompressedKVCache.import_pages:
        plan = _compressed_jobs(cache, layer, header, payload, seq)
    elif type(cache).import_pages is KVCache.import_pages:
        plan = _dense_jobs(cache, layer, header, payload, seq)
    else:
        return False
    if plan is None:
        return False
    dsts, jobs, ids = plan
    copy = copy_rows if payload.is_cuda else copy_rows_ref
    copy(payload, dsts, jobs, ids)
    return True


def _page_jobs(header, payload, codec: str, store, base_of, layer: int, seq: Sequence):
    """(page ids, one indexed job per store field: its pages into seq's first pages); base_of(name)
    is (dst index, byte offset of the field's page 0). import_layer checked the page count
    against the sequence's full pages; the reservation must hold them."""
    n = header["num_pages"]
    ids = seq.pages[:n]
    if len(ids) != n:
        raise ValueError(f"layer {layer}: {n} pages arrived for {len(seq.pages)} reserved")
    if header.get("codec") != codec:
        raise LayoutError(f"pages are {header.get('codec')!r}, this pool holds {codec!r}")
    jobs = []
    for name, (offset, page_bytes) in zip(
        store, device_page_fields(header, payload, store), strict=True
    ):
        dst, dst_offset = base_of(name)
        jobs.append(RowCopy(dst, dst_offset, offset, n, page_bytes, page_bytes, page_bytes, True))
    return ids, jobs


def _tail_job(spec: ExtraSpec, dst: int, dst_offset: int, tokens: int, dst_stride: int) -> RowCopy:
    """A [KVH, r, D] tail's first `tokens` tokens of every head into rows dst_stride apart."""
    kvh, r, d = spec.shape
    es = spec.dtype.itemsize
    return RowCopy(dst, dst_offset, spec.offset, kvh, tokens * d * es, r * d * es, dst_stride)


def _tail_spec(extras, name, dtype, kvh, d, layer) -> ExtraSpec | None:
    """The extra `name` if it is a [KVH, r, D] tail of `dtype`; None for another dtype (a cast:
    import_pages); ValueError when its shape is not a tail's."""
    spec = extras[name]
    if len(spec.shape) != 3 or spec.shape[0] != kvh or spec.shape[2] != d:
        raise ValueError(f"layer {layer}: {name} is {spec.shape}, a tail is [{kvh}, r, {d}]")
    return spec if spec.dtype == dtype else None


def _compressed_jobs(cache: CompressedKVCache, layer, header, payload, seq):
    """CompressedKVCache.import_pages's writes as jobs: the codes into seq's pages, the tail
    into its slot's open page, the sinks into its sink columns."""
    store = cache.stores[layer]
    names = list(store)
    ids, jobs = _page_jobs(
        header, payload, cache.codecs[layer].name, store, lambda f: (names.index(f), 0), layer, seq
    )
    n = len(ids)
    extras = device_extras(header, payload)
    if "open_k" not in extras or "open_v" not in extras:
        raise ValueError(f"layer {layer}: the 16-bit tail is missing")
    tail = cache.tail  # [layers, 2, slots, KVH, C, D], contiguous
    _, _, slots, kvh, cols, d = tail.shape
    specs = {k: _tail_spec(extras, k, tail.dtype, kvh, d, layer) for k in TAIL_KEYS if k in extras}
    if any(spec is None for spec in specs.values()):
        return None
    es = tail.element_size()
    row = cols * d * es  # one head's columns

    def at(kv: int, col: int) -> int:  # byte offset of (layer, kv, seq's slot, head 0, col)
        return (((layer * 2 + kv) * slots + seq.slot) * kvh * cols + col) * d * es

    t = len(store)  # the tail's index in dsts
    s = cache.n_sink
    r = specs["open_k"].shape[1]
    if specs["open_v"].shape[1] != r or r > cache.page_size:
        raise ValueError(
            f"layer {layer}: tails of {r} and {specs['open_v'].shape[1]} tokens for an open page "
            f"of {cache.page_size}"
        )
    for kv, name in enumerate(("open_k", "open_v")):
        jobs.append(_tail_job(specs[name], t, at(kv, s), r, row))
    if s:
        if "sink_k" in specs and "sink_v" in specs:
            sinks = (specs["sink_k"], specs["sink_v"])
        elif n == 0:  # no page encoded yet: the sinks lead the open page
            sinks = (specs["open_k"], specs["open_v"])
        else:
            raise ValueError(f"layer {layer}: the sink tokens are missing")
        count = min(s, r) if sinks[0] is specs["open_k"] else sinks[0].shape[1]
        if count > s or sinks[1].shape[1] < count:
            raise ValueError(f"layer {layer}: {count} sink tokens for {s} sink columns")
        for kv, spec in enumerate(sinks):
            jobs.append(_tail_job(spec, t, at(kv, 0), count, row))
    return [*store.values(), tail], jobs, ids


def _dense_jobs(cache: KVCache, layer, header, payload, seq):
    """KVCache.import_pages's writes as jobs: the full pages, then the partly filled page's
    tokens into seq's next page."""
    storage = cache.storage  # [layers, 2, pages, KVH, P, D], contiguous
    _, _, num_pages, kvh, p, d = storage.shape
    es = storage.element_size()
    page_bytes = kvh * p * d * es
    k, v = cache.layer(layer)

    def base(kv: int) -> int:
        return (layer * 2 + kv) * num_pages * page_bytes

    ids, jobs = _page_jobs(
        header,
        payload,
        cache.codec.name,
        {"k": k, "v": v},
        lambda f: (0, base("kv".index(f))),
        layer,
        seq,
    )
    n = len(ids)
    r = seq.num_tokens - n * p
    if not 0 <= r < p:
        raise ValueError(
            f"layer {layer}: {n} full pages arrived for a prompt of {seq.num_tokens} tokens"
        )
    if not r:
        return [storage], jobs, ids
    extras = device_extras(header, payload)
    if "open_k" not in extras or "open_v" not in extras:
        raise ValueError(f"layer {layer}: the 16-bit tail is missing")
    specs = {k: _tail_spec(extras, k, storage.dtype, kvh, d, layer) for k in ("open_k", "open_v")}
    if any(spec is None for spec in specs.values()):
        return None
    check_open_tail(layer, n, r, specs["open_k"].shape[1], specs["open_v"].shape[1], seq)
    last = seq.pages[n]
    for kv, name in enumerate(("open_k", "open_v")):
        jobs.append(_tail_job(specs[name], 0, base(kv) + last * page_bytes, r, p * d * es))
    return [storage], jobs, ids
