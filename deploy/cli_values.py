"""The value types of the `zipserve` command's options (argparse `type=` callables and the
checks of comma-separated lists), and help text several subcommands share."""

from __future__ import annotations

import argparse


def csv_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def csv_links(text: str) -> list[float | None]:
    """ "10,25,100,none" -> [10.0, 25.0, 100.0, None]."""
    try:
        return [
            None if x.strip().lower() in ("none", "unlimited", "inf") else float(x)
            for x in text.split(",")
            if x.strip()
        ]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Gb/s numbers or 'none', got {text!r}") from None


def csv_floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


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
