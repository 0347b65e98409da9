"""The typed errors of the KV wire: what went wrong with a message, by kind.

All are ValueErrors (a bad message is bad input: the request it carries fails, the server goes
on). Callers that count failures by reason catch the subclass (`except ChecksumError`), never
match the text.
"""

from __future__ import annotations


class WireError(ValueError):
    """A buffer that is not a zipserve KV message, or one that fails its checks."""


class FormatError(WireError):
    """Not a well-formed message of its format: unknown magic or version, unreadable header,
    sizes that do not add up, an unknown dtype, a truncated body."""


class ChecksumError(WireError):
    """The bytes changed on the way: the payload's checksum (CRC32 of host bytes, wsum31 of a
    device buffer) is not the one its sender computed."""


class LayoutError(WireError):
    """Well-formed pages that do not fit where they are going: another codec, other fields,
    dtypes or per-page shapes, or more pages than were reserved."""
