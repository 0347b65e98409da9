"""The value types of the `zipserve` command's options (argparse `type=` callables and the
checks of comma-separated lists), and help text several subcommands share."""

from __future__ import annotations

import argparse


class Bounded:
    """An argparse `type=` for a number with a range: `Bounded(int, 1)` takes integers >= 1,
    `Bounded(float, 0, above=True)` numbers > 0. A value out of range or not a number is an
    error naming the option (argparse prefixes "argument --x:"), before anything runs."""

    def __init__(self, kind: type, lo: float, *, above: bool = False, hi: float | None = None):
        self.kind, self.lo, self.above, self.hi = kind, lo, above, hi
        self.__name__ = self.rule  # argparse names a type by its __name__ in some messages

    @property
    def rule(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.hi is not None:
            return f"{what} in {'(' if self.above else '['}{self.lo}, {self.hi}]"
        return f"{what} {'>' if self.above else '>='} {self.lo}"

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {self.rule}, got {text!r}") from None
        low_ok = value > self.lo if self.above else value >= self.lo  # False for NaN too
        if not low_ok or (self.hi is not None and value > self.hi):
            raise argparse.ArgumentTypeError(f"expected {self.rule}, got {text!r}")
        return value


positive_int = Bounded(int, 1)
"""Counts that must be at least one: tokens, workers, requests, iterations."""
nonneg_int = Bounded(int, 0)
"""Counts where 0 means none or off, and seeds."""
port_number = Bounded(int, 0, hi=65535)
"""A TCP port (0: any free one)."""
positive_float = Bounded(float, 0, above=True)
"""Seconds, rates, link speeds, sizes, scales."""
nonneg_float = Bounded(float, 0)
"""Where 0 is meaningful: a temperature, a demo link of 0 (unlimited)."""
fraction = Bounded(float, 0, above=True, hi=1)
"""A share in (0, 1]: top-p, a byte budget relative to bf16."""


def _csv(text: str, item, what: str) -> list:
    try:
        values = [item(x.strip()) for x in text.split(",") if x.strip()]
    except (argparse.ArgumentTypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
    return values


def csv_ints(text: str) -> list[int]:
    """ "1,8,32" -> [1, 8, 32]: batch sizes, context lengths (each >= 1)."""
    return _csv(text, positive_int, "integers >= 1")


def csv_links(text: str) -> list[float | None]:
    """ "10,25,100,none" -> [10.0, 25.0, 100.0, None]: link speeds in Gb/s (> 0) or unlimited."""
    return _csv(
        text,
        lambda x: None if x.lower() in ("none", "unlimited", "inf") else positive_float(x),
        "Gb/s numbers > 0 or 'none'",
    )


def csv_floats(text: str) -> list[float]:
    """ "0.5,1,2" -> [0.5, 1.0, 2.0]: arrival rates (each > 0)."""
    return _csv(text, positive_float, "numbers > 0")


def csv_codecs(text: str) -> str:
    """A comma-separated list of codecs, each optionally with a decode-kv lane ("hack2/dense"),
    checked against the codec registry; the text itself is returned (callers split it)."""
    from zipserve.compress.codecs import codec_entry
    from zipserve.engine.decode_kv import DECODE_KV_MODES

    names = [x.strip() for x in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated codec names, got {text!r}")
    for name in names:
        codec, slash, mode = name.partition("/")
        try:
            codec_entry(codec)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("codec: ")) from None
        if slash and mode not in DECODE_KV_MODES:
            raise argparse.ArgumentTypeError(
                f"{name!r}: the lane after '/' must be one of {', '.join(DECODE_KV_MODES)}"
            )
    return ",".join(names)


def csv_modes(text: str) -> list[str]:
    """ "compressed,dense" -> ["compressed", "dense"], each a decode_kv mode."""
    from zipserve.engine.decode_kv import DECODE_KV_MODES

    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in DECODE_KV_MODES]
    if not modes or bad:
        raise ValueError(
            f"--decode-kv: expected {', '.join(DECODE_KV_MODES)} (comma-separated), got {text!r}"
        )
    return modes


DECODE_KV_HELP = (
    "what decode workers keep of a codec's KV: compressed (the codec's pages and "
    "kernel), dense (received layers dequantized into bf16 pages, bf16 kernel: "
    "the codec's quality, bf16's kernel) or auto (chosen per deployment from "
    "measured kernel speed and memory; README)"
)
