"""One sequence's KV, one layer at a time, out of a cache and into another (prefill -> decode).

A `LayerKV` is what travels for a layer: the sequence's encoded full pages in the wire form of
compress/wire.py, plus (compressed caches) its 16-bit open page and sinks. The decode side writes
them into pages and a slot it reserved beforehand; page ids need not match.

Two forms: `LayerKV` (host bytes, CRC32; any transport) and `DeviceLayerKV` (one flat buffer left
on the device plus a small JSON header with a device-computed checksum; for channels that carry
device tensors: in-process, CUDA IPC, NCCL). `export_layer(..., device_form=True)` makes the
second; `import_layer` takes either and writes device-to-device for the second.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from dataclasses import dataclass, field
from collections.abc import Callable

import torch

from zipserve.compress.device_wire import DeviceWire, pack_device, unpack_device, verify_checksum
from zipserve.compress.wire import DTYPES, WireError, pack_pages, unpack_pages
from zipserve.engine.paged_cache import LayerPages, PagedKVCache
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


_side = threading.local()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's own CUDA stream on `device` (created once)."""
    streams = _side.__dict__.setdefault("streams", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


_MAGIC = b"ZKVL\x01"
DEVICE_MAGIC = b"ZKVD\x01"
"""Starts the header message of a DeviceLayerKV (its payload follows as a second message)."""


@dataclass
class DeviceLayerKV:
    """One layer's KV as a device buffer: wire.header names codec, layout version, shapes and
    the checksum; wire.payload holds pages then tail tensors (see compress/device_wire.py)."""

    layer: int
    num_tokens: int
    wire: DeviceWire
    request_id: str = ""
    ready: object = None
    """torch.cuda.Event recorded after the gather (None on CPU): readers wait on it."""
    release: Callable[[], None] | None = None
    """Receiver side: returns the mapped buffer to its sender (CUDA IPC); None otherwise."""
    checksum_error: str | None = None
    checked: bool = False
    """verify() ran (receivers call it before taking any lock: it synchronizes once)."""

    def verify(self) -> bool:
        """Check the payload against the header's checksum on its device; remembers the
        outcome for import_layer. True when it matches. On CUDA the check runs on a side stream
        of the calling thread, so it waits for the sender's gather, not for the decode steps
        queued on the GPU meanwhile."""
        if not self.checked:
            payload = self.wire.payload
            if payload.is_cuda:
                with torch.cuda.stream(_side_stream(payload.device)):
                    self._verify()
            else:
                self._verify()
            self.checked = True
        return self.checksum_error is None

    def _verify(self) -> None:
        self.wait_ready()
        try:
            # in process the sender's header never went through header_bytes: finalize fills
            # its checksum from the reduction queued behind the gather
            verify_checksum(self.wire.finalize(), self.wire.payload)
        except WireError as e:
            self.checksum_error = str(e)

    def nbytes(self) -> int:
        return int(self.wire.payload.numel())

    def header_bytes(self) -> bytes:
        """DEVICE_MAGIC + JSON (synchronizes once for the checksum)."""
        self.wait_ready()
        h = {"layer": self.layer, "num_tokens": self.num_tokens, "request_id": self.request_id,
             "wire": self.wire.finalize()}
        return DEVICE_MAGIC + json.dumps(h).encode()

    @classmethod
    def from_header(cls, data: bytes, payload: torch.Tensor,
                    release: Callable[[], None] | None = None) -> DeviceLayerKV:
        """Parse header_bytes output around a received payload; ValueError on anything else."""
        if data[:len(DEVICE_MAGIC)] != DEVICE_MAGIC:
            raise ValueError("not a zipserve device LayerKV header")
        h = json.loads(data[len(DEVICE_MAGIC):])
        return cls(h["layer"], h["num_tokens"], DeviceWire(h["wire"], payload), h["request_id"],
                   release=release)

    def wait_ready(self) -> None:
        """Make the current stream wait for the gather that filled the payload."""
        if self.ready is not None:
            torch.cuda.current_stream(self.wire.payload.device).wait_event(self.ready)

    def done(self) -> None:
        """The receiver is finished with the payload (idempotent)."""
        release, self.release = self.release, None
        if release is not None:
            self.wire.payload = torch.empty(0, dtype=torch.uint8)  # drop our view of the mapping
            release()


def export_layer(cache: PagedKVCache, layer: int, seq: Sequence, num_tokens: int | None = None,
                 device_form: bool = False) -> LayerKV | DeviceLayerKV:
    """The first num_tokens (default: seq.num_cached) tokens' KV of one layer; device_form: as a
    DeviceLayerKV on the cache's device (nothing synchronizes or touches the host). ValueError
    when the cache cannot send what it holds (decode_kv=dense)."""
    n = seq.num_cached if num_tokens is None else num_tokens
    out = cache.export_pages(layer, seq, n)
    if device_form:
        return _export_device(out, layer, seq, n)
    tail = {k: t.cpu().clone() for k, t in out.tail.items()}
    return LayerKV(layer, n, pack_pages(out.codec, out.store, out.page_ids), tail,
                   seq.request_id)


def _export_device(out: LayerPages, layer: int, seq: Sequence, n: int) -> DeviceLayerKV:
    wire = pack_device(out.codec, out.store, out.page_ids, extras=out.tail)
    ready = None
    if wire.payload.is_cuda:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(wire.payload.device))
    return DeviceLayerKV(layer, n, wire, seq.request_id, ready)


def import_layer(cache: PagedKVCache, kv: LayerKV | DeviceLayerKV, seq: Sequence) -> None:
    """Write a received layer into seq's reserved pages (and slot). Raises ValueError (WireError)
    when the pages are corrupt (checksum) or of another codec/layout. A dense-mode cache
    (decode_kv=dense) takes its codec's wire form and dequantizes it on the way in."""
    if isinstance(kv, DeviceLayerKV):
        if not kv.verify():
            raise WireError(kv.checksum_error)
        wire, tail = unpack_device(kv.wire.header, kv.wire.payload, verify=False)
    else:
        wire, tail = unpack_pages(kv.pages), kv.tail
    cache.import_pages(kv.layer, wire, tail, seq)
