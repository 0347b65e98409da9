"""One layer of one sequence on the wire, in its two forms.

- `LayerKV` (ZKVL, host bytes): the sequence's encoded full pages as a ZIPKV buffer (pages.py),
  CRC32-checked, plus the 16-bit tail (open page, sinks) as raw tensors; any channel.
- `DeviceLayerKV` (ZKVD): the same as one flat device buffer (device_pages.py) and a small header
  with a device-computed checksum, for channels that carry device tensors (in-process, CUDA IPC,
  NCCL): the header travels as one message, the payload as the next.

The tail: open_k/open_v [KVH, r, D] (the partly filled page's tokens), sink_k/sink_v [KVH, s, D]
(a codec's sinks once a page is encoded). `first_page`: the index of the first full page carried
(a delta transfer: the receiver holds the pages before it, and the sinks, from its prefix
cache); 0 for a whole sequence. `body_fields` / `read_body` encode the pages + tail body
that LayerKV and a prefill group's slice (slice.py) share.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from zipserve.compress.wire.checksum import PendingChecksum
from zipserve.compress.wire.device_pages import (
    DeviceWire,
    compare_checksum,
    start_checksum,
)
from zipserve.compress.wire.errors import FormatError, WireError
from zipserve.compress.wire.framing import (
    DEVICE_HEADER,
    LAYER,
    dtype_name,
    dtype_of,
    frame,
    nbytes_of,
    raw_bytes,
    tensor_from,
    unframe,
)


def body_fields(pages: bytes, tail: dict[str, torch.Tensor]) -> tuple[dict, list[bytes]]:
    """Header fields and body parts of a pages buffer followed by raw tail tensors."""
    tail = {name: t.contiguous().cpu() for name, t in tail.items()}
    fields = {
        "pages_nbytes": len(pages),
        "tail": [
            {"name": n, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
            for n, t in tail.items()
        ],
    }
    return fields, [pages] + [raw_bytes(t) for t in tail.values()]


def read_body(header: dict, body: memoryview, what: str) -> tuple[bytes, dict[str, torch.Tensor]]:
    """(pages buffer, tail tensors) of a body written with body_fields; FormatError when the
    header does not describe it."""
    try:
        n_pages, specs = header["pages_nbytes"], header["tail"]
        if len(body) < n_pages:
            raise FormatError(f"{what} truncated in its pages")
        pages, pos, tail = bytes(body[:n_pages]), n_pages, {}
        for f in specs:
            dtype = dtype_of(f["dtype"], f["name"])
            n = nbytes_of(dtype, f["shape"])
            if len(body) < pos + n:
                raise FormatError(f"{what} truncated in tail tensor {f['name']}")
            tail[f["name"]] = tensor_from(body[pos : pos + n], dtype, f["shape"])
            pos += n
    except (KeyError, TypeError, RuntimeError) as e:
        raise FormatError(f"unreadable {what}: {type(e).__name__}: {e}") from e
    return pages, tail


@dataclass
class LayerKV:
    layer: int
    num_tokens: int
    """Tokens of the sequence whose KV this is."""
    pages: bytes
    """ZIPKV buffer (pages.py): the encoded full pages (bf16: the dense pages as they are)."""
    tail: dict[str, torch.Tensor] = field(default_factory=dict)
    """open_k/open_v [KVH, r, D], sink_k/sink_v [KVH, s, D] (16-bit, CPU); bf16: the partly
    filled page's tokens only, none when the sequence is whole pages."""
    request_id: str = ""
    first_page: int = 0
    """Index of the first full page in `pages` (the receiver holds those before it)."""

    def nbytes(self) -> int:
        return len(self.pages) + sum(t.numel() * t.element_size() for t in self.tail.values())

    def to_bytes(self) -> bytes:
        """One ZKVL message (no pickle): header, then the pages buffer and raw tail tensors."""
        fields, body = body_fields(self.pages, self.tail)
        return frame(
            LAYER,
            {
                "layer": self.layer,
                "num_tokens": self.num_tokens,
                "request_id": self.request_id,
                "first_page": self.first_page,
                **fields,
            },
            *body,
        )

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> LayerKV:
        """Parse to_bytes output; FormatError on anything else."""
        f = unframe(data, LAYER)
        pages, tail = read_body(f.header, f.body, "LayerKV buffer")
        h = f.header
        try:
            return cls(h["layer"], h["num_tokens"], pages, tail, h["request_id"], _first_page(h))
        except KeyError as e:
            raise FormatError(f"unreadable LayerKV buffer: missing {e}") from e


_side = threading.local()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's own CUDA stream on `device` (created once)."""
    streams = _side.__dict__.setdefault("streams", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


@dataclass(frozen=True)
class DeviceHeader:
    """A parsed ZKVD message: which layer its payload (the next message) holds."""

    layer: int
    num_tokens: int
    request_id: str
    wire: dict
    """DeviceWire.header: codec, layout version, fields, extras, nbytes, checksum."""
    first_page: int = 0


def _first_page(header: dict) -> int:
    """A header's first_page (0 when absent: a sender from before delta transfers)."""
    first = header.get("first_page", 0)
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise FormatError(f"unreadable KV header: first_page {first!r}")
    return first


def decode_device_header(data: bytes | bytearray | memoryview) -> DeviceHeader:
    h = unframe(data, DEVICE_HEADER).header
    try:
        return DeviceHeader(h["layer"], h["num_tokens"], h["request_id"], h["wire"], _first_page(h))
    except KeyError as e:
        raise FormatError(f"unreadable device LayerKV header: missing {e}") from e


@dataclass
class DeviceLayerKV:
    """One layer's KV as a device buffer: wire.header names codec, layout version, shapes and
    the checksum; wire.payload holds pages then tail tensors (device_pages.py)."""

    layer: int
    num_tokens: int
    wire: DeviceWire
    request_id: str = ""
    ready: object = None
    """torch.cuda.Event recorded after the gather (None on CPU): readers wait on it."""
    release: Callable[[], None] | None = None
    """Receiver side: returns the mapped buffer to its sender (CUDA IPC); None otherwise."""
    first_page: int = 0
    """Index of the first full page in the payload (the receiver holds those before it)."""
    verify_error: WireError | None = None
    """What verify() found wrong (ChecksumError, or FormatError for an unknown algorithm)."""
    checked: bool = False
    """verify() ran."""
    _pending: PendingChecksum | None = field(default=None, repr=False)
    """The checksum start_verify queued (CUDA), until verify() reads it."""

    def start_verify(self) -> None:
        """Queue the checksum on this thread's side stream, after `ready`, without waiting for
        it (a receiver's thread: waiting per layer there let it take one layer per decode step
        on a busy GPU). `settled()` says when verify() will not wait. On CPU: verify() now."""
        if self.checked or self._pending is not None:
            return
        payload = self.wire.payload
        on_side = torch.cuda.stream(_side_stream(payload.device)) if payload.is_cuda else None
        with on_side or contextlib.nullcontext():
            self.wait_ready()
            try:
                # in process the sender's header never went through header_bytes: finalize
                # fills its checksum from the reduction queued behind the gather
                self._pending = start_checksum(self.wire.finalize(), payload)
            except WireError as e:
                self.verify_error, self.checked = e, True
        if not payload.is_cuda:
            self._settle()  # computed already

    def settled(self) -> bool:
        """True when verify() will not wait for the GPU: it ran, or start_verify's checksum
        has been computed."""
        return self.checked or (self._pending is not None and self._pending.done())

    def verify(self) -> bool:
        """Check the payload against the header's checksum on its device; remembers the
        outcome for `check`. True when it matches. On CUDA the check runs on a side stream
        of the calling thread, so it waits for the sender's gather, not for the decode steps
        queued on the GPU meanwhile (after start_verify: only for that checksum)."""
        self.start_verify()
        self._settle()
        return self.verify_error is None

    def _settle(self) -> None:
        """Read start_verify's checksum (waiting for it, unless settled) and compare."""
        if self.checked:
            return
        pending, self._pending = self._pending, None
        try:
            compare_checksum(self.wire.finalize(), pending.value())
        except WireError as e:
            self.verify_error = e
        self.checked = True

    def sending(self) -> contextlib.AbstractContextManager:
        """Where to send the payload from: on CUDA this thread's side stream, ordered after the
        gather (`ready`). A CUDA-IPC send records the event its receiver waits on in the current
        stream; on the forward pass's stream that event would complete only after every layer
        queued since, and the receiver's decode steps would wait for the whole prefill."""
        payload = self.wire.payload
        if not payload.is_cuda:
            return contextlib.nullcontext()
        side = _side_stream(payload.device)
        if self.ready is None:  # no gather event: order after everything queued so far
            side.wait_stream(torch.cuda.current_stream(payload.device))
        return torch.cuda.stream(side)

    def check(self) -> None:
        """verify(), raising what it found (ChecksumError when the payload changed)."""
        if not self.verify():
            raise self.verify_error

    def nbytes(self) -> int:
        return int(self.wire.payload.numel())

    def header_bytes(self) -> bytes:
        """The ZKVD message (synchronizes once for the checksum)."""
        self.wait_ready()
        return frame(
            DEVICE_HEADER,
            {
                "layer": self.layer,
                "num_tokens": self.num_tokens,
                "request_id": self.request_id,
                "first_page": self.first_page,
                "wire": self.wire.finalize(),
            },
        )

    @classmethod
    def from_header(
        cls, data: bytes, payload: torch.Tensor, release: Callable[[], None] | None = None
    ) -> DeviceLayerKV:
        """Parse header_bytes output around a received payload; FormatError on anything else."""
        h = decode_device_header(data)
        return cls(
            h.layer,
            h.num_tokens,
            DeviceWire(h.wire, payload),
            h.request_id,
            release=release,
            first_page=h.first_page,
        )

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
