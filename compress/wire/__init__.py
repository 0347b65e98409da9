"""Every KV message on the wire: its formats, their framing, the checksums and typed errors.

framing.py  the one framing (magic, header length, JSON header, body) and the four magics
pages.py    ZIPKV: encoded pages of one layer, host bytes + CRC32 (WirePages, pack/unpack, adopt)
device_pages.py  the same pages left in one device buffer, with a device-computed checksum
layer.py    ZKVL / ZKVD: one layer of one sequence, host form (LayerKV) or device form
            (DeviceLayerKV: a header message, then its payload)
slice.py    ZKVS: one rank's slice of one layer from a prefill group (SliceKV)
checksum.py CRC32 of host bytes, wsum31 of device buffers
errors.py   WireError > FormatError, ChecksumError, LayoutError
decode.py   `decode`: any message, dispatched on its magic

Who writes and reads them: engine/kv_export.py (a cache's layer out and in), prefill_group/
slices.py (a group's slices), transfer/kv_messages.py (which form a channel carries).
"""

from zipserve.compress.wire.checksum import ALGORITHM, device_checksum, host_checksum
from zipserve.compress.wire.decode import Message, decode
from zipserve.compress.wire.device_pages import (
    DeviceWire,
    ExtraSpec,
    device_extras,
    device_page_fields,
    pack_device,
    unpack_device,
    verify_checksum,
)
from zipserve.compress.wire.errors import (
    ChecksumError,
    FormatError,
    LayoutError,
    WireError,
)
from zipserve.compress.wire.framing import (
    DEVICE_HEADER,
    DTYPES,
    LAYER,
    PAGES,
    SLICE,
    format_of,
    frame,
    unframe,
)
from zipserve.compress.wire.layer import DeviceHeader, DeviceLayerKV, LayerKV
from zipserve.compress.wire.pages import (
    LAYOUT_VERSION,
    WirePages,
    adopt_pages,
    check_fields,
    check_layout,
    pack_pages,
    unpack_pages,
)
from zipserve.compress.wire.slice import (
    SliceKV,
    SliceMessage,
    slice_from_bytes,
    slice_to_bytes,
)

__all__ = [
    "ALGORITHM",
    "DEVICE_HEADER",
    "DTYPES",
    "LAYER",
    "LAYOUT_VERSION",
    "PAGES",
    "SLICE",
    "ChecksumError",
    "DeviceHeader",
    "DeviceLayerKV",
    "DeviceWire",
    "FormatError",
    "LayerKV",
    "LayoutError",
    "Message",
    "SliceKV",
    "SliceMessage",
    "WireError",
    "WirePages",
    "adopt_pages",
    "check_fields",
    "check_layout",
    "decode",
    "device_checksum",
    "frame",
    "host_checksum",
    "format_of",
    "pack_device",
    "pack_pages",
    "slice_from_bytes",
    "slice_to_bytes",
    "unframe",
    "unpack_device",
    "device_page_fields",
    "device_extras",
    "ExtraSpec",
    "unpack_pages",
    "verify_checksum",
]
