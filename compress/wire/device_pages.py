"""Encoded KV pages left on the device: what a ZKVD message (layer.py) describes and carries. A
small JSON header (codec, layout version, page count, every tensor's dtype, shape and offset, a
checksum) plus ONE flat uint8 buffer that stays on the device it was gathered on (no host copy,
no CRC32 on the host).

`pack_device` gathers pages straight into the flat buffer (index_select into views of it) and
appends extra tensors (the 16-bit tail); each tensor starts at a 16-byte aligned offset.
`checksum` is checksum.py's `device_partials` over the whole buffer; it is computed lazily
(`DeviceWire.finalize`) so the caller decides where the one host synchronization for its value
happens (the sender thread, not inside the forward pass). `unpack_device` verifies the checksum on
the buffer's device and returns `WirePages` views plus the extras for `pages.adopt_pages`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from zipserve.compress.device_copy import index_on
from zipserve.compress.wire.checksum import ALGORITHM, PendingChecksum, device_partials
from zipserve.compress.wire.errors import ChecksumError, FormatError, LayoutError
from zipserve.compress.wire.framing import dtype_name, dtype_of
from zipserve.compress.wire.pages import LAYOUT_VERSION, WirePages

ALIGN = 16


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class DeviceWire:
    header: dict
    """codec, layout_version, num_pages, fields (pages), extras, nbytes, checksum_algorithm,
    checksum (None until finalize)."""
    payload: torch.Tensor
    """uint8 [nbytes] on the device."""
    _pending: PendingChecksum | None = field(default=None, repr=False)

    def finalize(self) -> dict:
        """Fill header['checksum'] (waits for the checksum's reduction, not for the whole
        stream) and return the header."""
        if self.header.get("checksum") is None:
            pending = (
                self._pending
                if self._pending is not None
                else PendingChecksum(device_partials(self.payload))
            )
            self.header["checksum"] = pending.value()
            self._pending = None
        return self.header


def pack_device(
    codec: str,
    store: dict[str, torch.Tensor],
    page_ids: torch.Tensor,
    extras: dict[str, torch.Tensor] | None = None,
) -> DeviceWire:
    """Gather pages page_ids of a codec store (and extra tensors) into one flat device buffer.
    Queues the checksum reduction right behind the gather (no synchronization)."""
    extras = extras or {}
    device = next(iter(store.values())).device
    ids = index_on(page_ids, device)  # [n]
    n = int(ids.numel())
    fields, extra_fields, offset = [], [], 0
    for name, t in store.items():
        nbytes = n * math.prod(t.shape[1:]) * t.element_size()
        fields.append(
            {
                "name": name,
                "dtype": dtype_name(t.dtype),
                "page_shape": list(t.shape[1:]),
                "offset": offset,
                "nbytes": nbytes,
            }
        )
        offset = _align(offset + nbytes)
    for name, t in extras.items():
        nbytes = t.numel() * t.element_size()
        extra_fields.append(
            {
                "name": name,
                "dtype": dtype_name(t.dtype),
                "shape": list(t.shape),
                "offset": offset,
                "nbytes": nbytes,
            }
        )
        offset = _align(offset + nbytes)
    # [nbytes]; alignment pads stay uninitialized: the checksum covers the bytes as sent
    payload = torch.empty(offset, dtype=torch.uint8, device=device)
    for f, t in zip(fields, store.values(), strict=True):
        if f["nbytes"]:
            # gather as bytes: works for every dtype (fp8 included) and copies nothing twice
            src = t.reshape(t.shape[0], -1).view(torch.uint8)  # [P, page bytes]
            out = payload[f["offset"] : f["offset"] + f["nbytes"]].view(n, -1)  # [n, page bytes]
            torch.index_select(src, 0, ids, out=out)
    for f, t in zip(extra_fields, extras.values(), strict=True):
        if f["nbytes"]:
            dst = payload[f["offset"] : f["offset"] + f["nbytes"]]
            dst.copy_(t.to(device).contiguous().reshape(-1).view(torch.uint8))
    header = {
        "codec": codec,
        "layout_version": LAYOUT_VERSION,
        "num_pages": n,
        "fields": fields,
        "extras": extra_fields,
        "nbytes": offset,
        "checksum_algorithm": ALGORITHM,
        "checksum": None,
    }
    return DeviceWire(header, payload, PendingChecksum(device_partials(payload)))


def _view(
    payload: torch.Tensor, offset: int, nbytes: int, dtype: torch.dtype, shape: list[int]
) -> torch.Tensor:
    return payload[offset : offset + nbytes].view(dtype).view(shape)


def verify_checksum(header: dict, payload: torch.Tensor) -> None:
    """Recompute the checksum on the payload's device (one synchronization); ChecksumError when
    it differs from the header's, FormatError when the header names another algorithm."""
    compare_checksum(header, start_checksum(header, payload).value())


def start_checksum(header: dict, payload: torch.Tensor) -> PendingChecksum:
    """Queue the payload's checksum on the current stream without waiting for it; FormatError
    when the header names another algorithm or none."""
    if header.get("checksum_algorithm") != ALGORITHM or header.get("checksum") is None:
        raise FormatError(f"unknown or missing checksum ({header.get('checksum_algorithm')!r})")
    return PendingChecksum(device_partials(payload))


def compare_checksum(header: dict, got: int) -> None:
    """ChecksumError when the recomputed checksum `got` differs from the header's."""
    if got != header["checksum"]:
        raise ChecksumError(
            "checksum mismatch: the pages were corrupted in transit "
            f"({got:#x} != {header['checksum']:#x})"
        )


def unpack_device(
    header: dict, payload: torch.Tensor, verify: bool = True
) -> tuple[WirePages, dict[str, torch.Tensor]]:
    """Views of a device buffer as pages + extras; raises FormatError on a bad layout version,
    size or dtype, ChecksumError on a bad checksum (verified on the payload's device)."""
    check_payload(header, payload)
    if verify:
        verify_checksum(header, payload)
    n = header["num_pages"]

    def views(specs, shape_of):
        out = {}
        for f in specs:
            dtype = _spec_dtype(f, payload)
            shape = shape_of(f)
            out[f["name"]] = (
                _view(payload, f["offset"], f["nbytes"], dtype, shape)
                if f["nbytes"]
                else torch.empty(shape, dtype=dtype, device=payload.device)
            )
        return out

    pages = views(header["fields"], lambda f: [n, *f["page_shape"]])
    extras = views(header.get("extras", []), lambda f: f["shape"])
    return WirePages(header["codec"], n, pages, header.get("meta", {})), extras


def check_payload(header: dict, payload: torch.Tensor) -> None:
    """FormatError unless the header is of this layout version and the payload is the flat
    uint8 buffer of the header's size."""
    if header.get("layout_version") != LAYOUT_VERSION:
        raise FormatError(
            f"layout version {header.get('layout_version')!r}, this side reads {LAYOUT_VERSION}"
        )
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise FormatError("device payload must be a flat uint8 tensor")
    if payload.numel() != header.get("nbytes"):
        raise FormatError(f"payload is {payload.numel()} bytes, header says {header.get('nbytes')}")


def _spec_dtype(f: dict, payload: torch.Tensor) -> torch.dtype:
    """A field's dtype; FormatError when its bytes lie outside the payload or off alignment."""
    dtype = dtype_of(f["dtype"], f["name"])
    if f["offset"] + f["nbytes"] > payload.numel() or f["offset"] % ALIGN:
        raise FormatError(f"{f['name']}: bytes {f['offset']}+{f['nbytes']} out of range")
    return dtype


def device_page_fields(
    header: dict, payload: torch.Tensor, store: dict[str, torch.Tensor]
) -> list[tuple[int, int]]:
    """(byte offset in the payload, bytes a page) of each of `store`'s fields, in store order,
    for a copy that writes the pages without views of them. FormatError as unpack_device raises
    it, LayoutError as pages.check_fields does (other fields, dtypes or page shapes); the codec
    is the caller's to check (`header["codec"]`)."""
    check_payload(header, payload)
    n = header["num_pages"]
    specs = {f["name"]: f for f in header["fields"]}
    if set(specs) != set(store):
        raise LayoutError(f"fields {sorted(specs)} do not match the pool's {sorted(store)}")
    out = []
    for name, t in store.items():
        f = specs[name]
        dtype = _spec_dtype(f, payload)
        if dtype != t.dtype or tuple(f["page_shape"]) != tuple(t.shape[1:]):
            raise LayoutError(
                f"{name}: {dtype} {tuple(f['page_shape'])} per page, pool has "
                f"{t.dtype} {tuple(t.shape[1:])}"
            )
        page_bytes = math.prod(t.shape[1:]) * t.element_size()
        if f["nbytes"] != n * page_bytes:
            raise FormatError(f"{name}: {f['nbytes']} bytes for {n} pages of {page_bytes}")
        out.append((f["offset"], page_bytes))
    return out


@dataclass(frozen=True)
class ExtraSpec:
    """Where an extra tensor (a tail) lies in a payload: [shape] of dtype from byte `offset`."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int


def device_extras(header: dict, payload: torch.Tensor) -> dict[str, ExtraSpec]:
    """The header's extras by name; FormatError when one lies outside the payload or its size
    is not its shape's."""
    out = {}
    for f in header.get("extras", []):
        dtype = _spec_dtype(f, payload)
        shape = tuple(f["shape"])
        if f["nbytes"] != math.prod(shape) * dtype.itemsize:
            raise FormatError(f"{f['name']}: {f['nbytes']} bytes for {dtype} {shape}")
        out[f["name"]] = ExtraSpec(dtype, shape, f["offset"])
    return out
