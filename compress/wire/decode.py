"""The one entry point that reads any KV message: it dispatches on the magic (framing.py)."""

from __future__ import annotations

from zipserve.compress.wire.errors import FormatError
from zipserve.compress.wire.framing import DEVICE_HEADER, LAYER, PAGES, SLICE, format_of
from zipserve.compress.wire.layer import DeviceHeader, LayerKV, decode_device_header
from zipserve.compress.wire.pages import WirePages, unpack_pages
from zipserve.compress.wire.slice import SliceMessage, slice_from_bytes

Message = WirePages | LayerKV | DeviceHeader | SliceMessage

_DECODERS = {
    PAGES: unpack_pages,
    LAYER: LayerKV.from_bytes,
    DEVICE_HEADER: decode_device_header,
    SLICE: slice_from_bytes,
}


def decode(data: bytes | bytearray | memoryview) -> Message:
    """The message in `data`, whichever format its magic names: WirePages (ZIPKV, checksum
    verified), LayerKV (ZKVL), DeviceHeader (ZKVD: its payload is the next message on the
    channel) or SliceMessage (ZKVS). FormatError for anything else, ChecksumError for pages
    that changed on the way."""
    reader = _DECODERS.get(format_of(data))
    if reader is None:
        raise FormatError("not a zipserve KV message")
    return reader(data)
