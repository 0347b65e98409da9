"""Every KV codec by name: the registry, and how a codec is built from its name.

An entry (`CodecEntry`) names a codec class and says what building it needs: the constructor
arguments it takes from a `CodecRequest` (default: num_kv_heads, page_size, head_dim), the
calibration file it reads beside the checkpoint, and the measured decode kernels it runs (keys of
engine/decode_kv.py's speed table). What the engine must know of the codec itself (dense pages,
a dense form, sinks, head sizes, CUDA-graph safety) is declared on its class (compress/codec.py).
A new codec is one class and one `register(CodecEntry(...))`; nothing else in the engine, the
wire or the prefill group names it.

Shipped: bf16 (the model's dense pages, compress/dense_codec.py), fp8, kivi2/4, hack2/4, hack2mix
(HACK with per-layer bits from a calibrated plan, compress/kvbits.py), lowrank and lowrank+hack2/4
(calibrated bases, compress/lowrank.py), lowrank+hack2mix (those bases with HACK of per-layer
width and bits from a measured plan, compress/lowrank_plan.py).

Head sizes (`head_dim_rule`): bf16, fp8 and lowrank take any even head_dim in [8, 256]; KIVI and
HACK a multiple of their channel group (32) up to 256.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from zipserve.compress.codec import (
    KVCodec,
    head_dim_fits,
    require_head_dim,
)
from zipserve.compress.codec import head_dim_rule as _rule
from zipserve.compress.dense_codec import DenseCodec
from zipserve.compress.fp8 import Fp8Codec
from zipserve.compress.hack import HackCodec
from zipserve.compress.kivi import KiviCodec
from zipserve.compress.kvbits import KVBITS_FILE, HackMixedCodec
from zipserve.compress.lowrank import LowRankCodec
from zipserve.compress.lowrank_bases import BASES_FILE, LowRankBases
from zipserve.compress.lowrank_plan import MIX_NAME, load_hack_plan


@dataclass(frozen=True)
class CodecRequest:
    """What a codec is built for."""

    num_kv_heads: int
    page_size: int
    head_dim: int
    model_dir: str | None = None
    """The checkpoint directory (or `random:NAME`): calibration files are read beside it."""
    bases_dir: str | None = None
    """Where the lowrank codecs read their bases when not beside the checkpoint (lowrank_bases)."""
    dtype: torch.dtype = torch.bfloat16
    """The model's dtype: what the dense codec's pages hold."""


@dataclass(frozen=True)
class CodecEntry:
    name: str
    codec_class: type[KVCodec]
    """Its class: what it can do (dense pages, a dense form, head sizes, ...)."""
    build: Callable[[CodecRequest], KVCodec] | None = None
    """The codec for a request; None: codec_class(num_kv_heads, page_size, head_dim)."""
    calibration: str | None = None
    """The file it reads beside the checkpoint, made by `zipserve calibrate` (None: nothing)."""
    decode_kernels: tuple[str, ...] = ()
    """Keys of the measured decode-kernel speeds (engine/decode_kv.py) of the kernels it runs
    (the slowest counts); () means its own name."""

    def make(self, request: CodecRequest) -> KVCodec:
        """The codec for `request`; ValueError naming head_dim when it cannot take it (before
        anything is read or built)."""
        require_head_dim(self.name, self.codec_class.head_dim_multiple, request.head_dim)
        if self.build is None:
            return self.codec_class(request.num_kv_heads, request.page_size, request.head_dim)
        return self.build(request)

    @property
    def kernels(self) -> tuple[str, ...]:
        return self.decode_kernels or (self.name,)


_REGISTRY: dict[str, CodecEntry] = {}


def register(entry: CodecEntry) -> CodecEntry:
    """Make `entry.name` a codec every engine, config and wire knows. ValueError when the name is
    taken."""
    if entry.name in _REGISTRY:
        raise ValueError(f"codec: {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Forget a codec registered with `register` (tests)."""
    _REGISTRY.pop(name, None)


def codec_names() -> tuple[str, ...]:
    """Every registered codec, the shipped ones first in their usual order."""
    return tuple(_REGISTRY)


def codec_entry(name: str) -> CodecEntry:
    """The entry of `name`; ValueError naming the known codecs for any other."""
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"codec: unknown codec {name!r}; known: {', '.join(_REGISTRY)}")
    return entry


def head_dim_rule(codec: str) -> str:
    """What `codec` needs of head_dim, in words (errors and the README table)."""
    return _rule(codec_entry(codec).codec_class.head_dim_multiple)


def head_dim_supported(codec: str, head_dim: int) -> bool:
    return head_dim_fits(codec_entry(codec).codec_class.head_dim_multiple, head_dim)


def check_head_dim(codec: str, head_dim: int) -> None:
    """ValueError naming head_dim, the codec and what it needs, when `codec` cannot take it."""
    require_head_dim(codec, codec_entry(codec).codec_class.head_dim_multiple, head_dim)


def make_codec(
    name: str,
    num_kv_heads: int,
    page_size: int,
    head_dim: int,
    model_dir: str | None = None,
    bases_dir: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> KVCodec:
    """The codec called `name` (bf16: the dense codec, pages in `dtype`). Calibrated codecs read
    their files beside the checkpoint in model_dir (lowrank: in bases_dir when given). An unknown
    name, or a head_dim the codec cannot take, raises ValueError naming what is wrong."""
    return codec_entry(name).make(
        CodecRequest(num_kv_heads, page_size, head_dim, model_dir, bases_dir, dtype)
    )


# -- the shipped codecs ----------------------------------------------------------------------------


def _lowrank(request: CodecRequest, name: str, bits: int | None) -> KVCodec:
    where = request.bases_dir or request.model_dir
    if where is None:
        raise ValueError(f"codec: {name} needs a model directory with calibrated bases")
    return LowRankCodec(
        name,
        request.num_kv_heads,
        request.page_size,
        request.head_dim,
        LowRankBases.load(where),
        bits,
    )


def _lowrank_mix(request: CodecRequest) -> KVCodec:
    """lowrank+hack2mix: the bases cut to each layer's planned width, HACK of its planned bits
    (lowrank_hack.json beside the bases)."""
    where = request.bases_dir or request.model_dir
    if where is None:
        raise ValueError(f"codec: {MIX_NAME} needs a model directory with calibrated bases")
    plan = load_hack_plan(where, head_dim=request.head_dim)
    bases = LowRankBases.load(where, ranks=(plan.widths, plan.widths))
    return LowRankCodec(
        MIX_NAME,
        request.num_kv_heads,
        request.page_size,
        request.head_dim,
        bases,
        plan.bits,
        plan.widths,
    )


def _register_shipped() -> None:
    register(
        CodecEntry(
            "bf16",
            DenseCodec,
            decode_kernels=("paged-bf16",),
            build=lambda r: DenseCodec(r.num_kv_heads, r.page_size, r.head_dim, r.dtype),
        )
    )
    register(CodecEntry("fp8", Fp8Codec))
    for bits in (2, 4):
        register(
            CodecEntry(
                f"kivi{bits}",
                KiviCodec,
                build=lambda r, b=bits: KiviCodec(r.num_kv_heads, r.page_size, r.head_dim, b),
            )
        )
    for bits in (2, 4):
        register(
            CodecEntry(
                f"hack{bits}",
                HackCodec,
                build=lambda r, b=bits: HackCodec(r.num_kv_heads, r.page_size, r.head_dim, b),
            )
        )
    # per-layer bits from kvbits.json (compress/kvbits.py); runs hack2's and hack4's kernels
    register(
        CodecEntry(
            "hack2mix",
            HackMixedCodec,
            calibration=KVBITS_FILE,
            decode_kernels=("hack2", "hack4"),
            build=lambda r: HackMixedCodec.load(
                r.num_kv_heads, r.page_size, r.head_dim, r.model_dir
            ),
        )
    )
    for name, bits in (("lowrank", None), ("lowrank+hack2", 2), ("lowrank+hack4", 4)):
        register(
            CodecEntry(
                name,
                LowRankCodec,
                calibration=BASES_FILE,
                build=lambda r, n=name, b=bits: _lowrank(r, n, b),
            )
        )
    # per-layer HACK width and bits on the bases (lowrank_hack.json beside them)
    register(CodecEntry(MIX_NAME, LowRankCodec, calibration=BASES_FILE, build=_lowrank_mix))


_register_shipped()

CODECS = codec_names()
"""The shipped codecs (a codec registered later is in codec_names(), not here)."""
