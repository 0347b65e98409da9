"""HACK quantized KV page layout (one layer) and pure-torch pack/unpack helpers.

Notation: P = page_size (64 by default; it is also the quantization partition along tokens), D = head_dim,
b = bits in {2, 4}, E = 8 // b codes per byte, DE = D // E bytes per token row, GV = V channel group size
(default 64, D % GV == 0), NG = D // GV groups.

Per (page, kv_head) a :class:`HackPages` pool holds
  * ``k_codes``  uint8   [num_pages, KVH, P, DE]  K quantized per channel over the page's P tokens
  * ``k_scale``  float16 [num_pages, KVH, D]       one scale per channel per page
  * ``k_min``    float16 [num_pages, KVH, D]       one minimum per channel per page
  * ``v_codes``  uint8   [num_pages, KVH, P, DE]  V quantized per token, in channel groups of GV
  * ``v_scale``  float16 [num_pages, KVH, P, NG]
  * ``v_min``    float16 [num_pages, KVH, P, NG]
  * ``k_sums``   float32 [num_pages, KVH, P]       sum over channels of each token's K codes
  * ``v_sums``   float32 [num_pages, KVH, D]       sum over the page's tokens of each channel's V codes

Quantization is asymmetric with unsigned codes: x ~= scale * code + min, code in [0, 2^b - 1],
code = clamp(floor((x - min) / scale + 0.5)), computed with the *stored* float16 scale and min (so the
error is <= scale / 2 up to float16 rounding of min/scale for x in [min, min + (2^b - 1) scale]; the
encoder's range clip, hack_encode.py, lets the extremes of a 2-bit group saturate).  A zero-range partition (max == min) stores
scale 0 and codes 0, so it dequantizes to min exactly.  Scales and mins are float16 whatever the model
dtype (inputs must lie within float16 range).  The sums are float32 (exact: at most 256 * 15).

Packing is *planar* along D: byte j of a token row holds channels j + s * DE for s = 0..E-1 at bit
offset s * b.  Unpacking plane s, ``(byte >> (s * b)) & (2^b - 1)``, gives the contiguous channel slice
[s * DE, (s + 1) * DE) of every token, so kernels need no interleave / reshape.

Also here: ``hack_bytes_per_token`` (exact byte accounting) and ``check_decode_args`` (argument
validation shared by hack_decode_attention and its reference).

Head sizes: the layout needs D % E == 0, GV | D and GV a multiple of DE (a V group never splits a
plane); the kernels take any such D up to 256 (planes that are not a power of two >= 16 wide are
padded in registers, kernels/head_dim.py). ``hack_group_v`` gives the V group HackCodec uses.

Sinks and the open page: the first ``n_sink`` (4) tokens of a sequence and its last, partly filled page
stay in 16-bit in a separate dense buffer owned by the caller.  Quantized page 0 still contains the sink
positions; attention over quantized pages skips positions < n_sink (see hack_decode_attention.py).
"""

from dataclasses import dataclass

import torch

from zipserve.kernels.arg_checks import FLOAT_DTYPES, is_pow2
from zipserve.kernels.head_dim import head_dim_ok

__all__ = [
    "HackPages",
    "check_bits",
    "codes_per_byte",
    "pack_planar",
    "unpack_planar",
    "hack_bytes_per_token",
    "hack_group_v",
    "check_decode_args",
]

_DECODE_MODES = ("f16", "int8")


def check_bits(bits) -> int:
    if bits not in (2, 4) or isinstance(bits, bool):
        raise ValueError(f"bits must be 2 or 4, got {bits!r}")
    return int(bits)


def codes_per_byte(bits: int) -> int:
    return 8 // check_bits(bits)


def hack_group_v(head_dim: int, bits: int, group_v: int = 32) -> int:
    """The V channel group for head_dim: the smallest multiple of the plane width D / E that is
    >= group_v (or D itself) and divides head_dim, since the kernels unpack V in planes of D / E
    channels and a group may not split one. D = 128, b = 2: 32; D = 96, b = 2: 48; D = 64, b = 4: 32."""
    e = codes_per_byte(bits)
    if head_dim <= 0 or head_dim % e:
        raise ValueError(f"head_dim {head_dim} is not a positive multiple of {e} (bits={bits})")
    de = head_dim // e
    g = de * max(1, -(-group_v // de))
    while head_dim % g:
        g += de
    return min(g, head_dim)


def pack_planar(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., D] integer in [0, 2^b) -> packed uint8 [..., D // E] (planar: byte j <- j + s*DE)."""
    e = codes_per_byte(bits)
    d = codes.shape[-1]
    if d % e:
        raise ValueError(f"codes last dim {d} is not a multiple of {e} (bits={bits})")
    planes = codes.to(torch.int32).reshape(*codes.shape[:-1], e, d // e)  # [..., E, DE]
    shifts = torch.arange(e, device=codes.device, dtype=torch.int32) * bits  # [E]
    return (planes << shifts[:, None]).sum(dim=-2).to(torch.uint8)


def unpack_planar(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """packed uint8 [..., DE] -> codes uint8 [..., DE * E] in natural channel order."""
    e = codes_per_byte(bits)
    shifts = torch.arange(e, device=packed.device, dtype=torch.int32) * bits  # [E]
    planes = (packed.to(torch.int32)[..., None, :] >> shifts[:, None]) & (
        (1 << bits) - 1
    )  # [..., E, DE]
    return planes.reshape(*packed.shape[:-1], packed.shape[-1] * e).to(torch.uint8)


def hack_bytes_per_token(
    head_dim: int, bits: int, group_v: int = 64, page_size: int = 64, include_sums: bool = True
) -> float:
    """Exact stored bytes per token per kv head, K and V together, amortized over a page.

    codes: 2 * D * b / 8; K scale+min: 2 * D * 2 / P; V scale+min: 2 * (D / GV) * 2;
    sums (float32): k_sums 4 per token + v_sums 4 * D / P.  D=128, b=2, GV=64, P=64: 80 B without the
    sums, 92 B with them (bf16 KV: 512 B).  The f16 decode mode reads no sums; int8 mode reads v_sums.
    """
    check_bits(bits)
    if head_dim % group_v:
        raise ValueError(f"head_dim {head_dim} is not a multiple of group_v {group_v}")
    codes = 2 * head_dim * bits / 8
    k_side = 2 * head_dim * 2 / page_size
    v_side = 2 * (head_dim // group_v) * 2
    sums = (4 + 4 * head_dim / page_size) if include_sums else 0.0
    return codes + k_side + v_side + sums


@dataclass
class HackPages:
    """A pool of HACK-quantized KV pages for one layer (shapes in the module docstring)."""

    k_codes: torch.Tensor
    v_codes: torch.Tensor
    k_scale: torch.Tensor
    k_min: torch.Tensor
    v_scale: torch.Tensor
    v_min: torch.Tensor
    k_sums: torch.Tensor
    v_sums: torch.Tensor
    bits: int
    group_v: int = 64

    @property
    def num_pages(self) -> int:
        return self.k_codes.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k_codes.shape[1]

    @property
    def page_size(self) -> int:
        return self.k_codes.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_scale.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.k_codes.device

    @classmethod
    def empty(cls, num_pages, num_kv_heads, page_size, head_dim, bits, group_v=64, device="cpu"):
        """Zero-filled pool.  Raises ValueError for an unsupported geometry."""
        e = codes_per_byte(bits)
        if head_dim % e or head_dim % group_v:
            raise ValueError(
                f"head_dim {head_dim} must be a multiple of {e} and of group_v {group_v}"
            )
        n, h, p, d = num_pages, num_kv_heads, page_size, head_dim
        z = lambda shape, dt: torch.zeros(shape, dtype=dt, device=device)  # noqa: E731
        return cls(
            k_codes=z((n, h, p, d // e), torch.uint8),
            v_codes=z((n, h, p, d // e), torch.uint8),
            k_scale=z((n, h, d), torch.float16),
            k_min=z((n, h, d), torch.float16),
            v_scale=z((n, h, p, d // group_v), torch.float16),
            v_min=z((n, h, p, d // group_v), torch.float16),
            k_sums=z((n, h, p), torch.float32),
            v_sums=z((n, h, d), torch.float32),
            bits=bits,
            group_v=group_v,
        )

    def tensors(self):
        return {
            name: getattr(self, name)
            for name in (
                "k_codes",
                "v_codes",
                "k_scale",
                "k_min",
                "v_scale",
                "v_min",
                "k_sums",
                "v_sums",
            )
        }

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def validate(self) -> None:
        """Check shapes / dtypes / devices / contiguity; raises ValueError naming the offending field."""
        e = codes_per_byte(self.bits)
        if self.k_codes.dim() != 4:
            raise ValueError(
                f"pages.k_codes must be [num_pages, KVH, P, D/E], got {tuple(self.k_codes.shape)}"
            )
        n, h, p, de = self.k_codes.shape
        d = de * e
        gv = self.group_v
        if not isinstance(gv, int) or gv <= 0 or d % gv:
            raise ValueError(f"pages.group_v {gv!r} must divide head_dim {d}")
        want = {
            "k_codes": ((n, h, p, de), torch.uint8),
            "v_codes": ((n, h, p, de), torch.uint8),
            "k_scale": ((n, h, d), torch.float16),
            "k_min": ((n, h, d), torch.float16),
            "v_scale": ((n, h, p, d // gv), torch.float16),
            "v_min": ((n, h, p, d // gv), torch.float16),
            "k_sums": ((n, h, p), torch.float32),
            "v_sums": ((n, h, d), torch.float32),
        }
        for name, (shape, dtype) in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"pages.{name} must be {dtype} {shape} (bits={self.bits}), "
                    f"got {t.dtype} {tuple(t.shape)}"
                )
            if t.device != self.k_codes.device:
                raise ValueError(
                    f"pages.{name} is on {t.device}, pages.k_codes on {self.k_codes.device}"
                )
            if not t.is_contiguous():
                raise ValueError(f"pages.{name} must be contiguous")


def check_decode_args(
    q,
    pages,
    page_table,
    n_pages,
    dense_k,
    dense_v,
    dense_lens,
    scale,
    bits,
    n_sink,
    num_splits,
    mode,
    out,
    dense_rows=None,
    dense_start=None,
    rotation=None,
):
    """Validate hack_decode_attention(_ref) arguments -> (B, H, KVH, P, D); ValueError names the argument."""
    if not isinstance(pages, HackPages):
        raise ValueError(f"pages must be a HackPages pool, got {type(pages).__name__}")
    pages.validate()
    if check_bits(bits) != pages.bits:
        raise ValueError(f"bits={bits} does not match pages.bits={pages.bits}")
    if mode not in _DECODE_MODES:
        raise ValueError(f"mode must be one of {_DECODE_MODES}, got {mode!r}")
    if q.dim() != 3 or q.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"q must be [B, num_heads, head_dim] of {FLOAT_DTYPES}, got {q.dtype} {tuple(q.shape)}"
        )
    (B, H, D), KVH, P, E = q.shape, pages.num_kv_heads, pages.page_size, 8 // pages.bits
    checks = [
        (pages.head_dim == D, "head_dim", f"pages head_dim {pages.head_dim} != q head_dim {D}"),
        (
            head_dim_ok(D) and D % E == 0,
            "head_dim",
            f"must be an even number in [8, 256] and a multiple of {E}, got {D}",
        ),
        (is_pow2(P) and P >= 16, "pages", f"page_size must be a power of two >= 16, got {P}"),
        (
            pages.group_v % (D // E) == 0,
            "pages",
            f"group_v {pages.group_v} must be a multiple of D / E = {D // E}",
        ),
        (H % KVH == 0, "num_heads", f"q num_heads {H} is not a multiple of num_kv_heads {KVH}"),
        (
            page_table.dtype == torch.int32 and page_table.dim() == 2 and page_table.shape[0] == B,
            "page_table",
            f"must be int32 [B={B}, max_pages], got {page_table.dtype} {tuple(page_table.shape)}",
        ),
    ]
    for name, t in (("n_pages", n_pages), ("dense_lens", dense_lens)):
        checks.append(
            (
                t.dtype == torch.int32 and t.shape == (B,) and t.is_contiguous(),
                name,
                f"must be contiguous int32 [B={B}], got {t.dtype} {tuple(t.shape)}",
            )
        )
    for name, t in (("dense_k", dense_k), ("dense_v", dense_v)):
        checks.append(
            (
                t.dtype == q.dtype
                and t.dim() == 4
                and t.shape == dense_k.shape
                and t.shape[1] == KVH
                and (dense_rows is not None or t.shape[0] == B)
                and t.shape[3] == D,
                name,
                f"must be {q.dtype} [B={B} (or rows indexed by dense_rows), KVH={KVH}, T, D={D}]"
                f" (same for k and v), got {t.dtype} {tuple(t.shape)}",
            )
        )
    for name, t in (("dense_rows", dense_rows), ("dense_start", dense_start)):
        if t is not None:
            checks.append(
                (
                    t.dtype == torch.int32 and t.shape == (B,) and t.is_contiguous(),
                    name,
                    f"must be contiguous int32 [B={B}], got {t.dtype} {tuple(t.shape)}",
                )
            )
            checks.append((t.device == q.device, name, f"is on {t.device}, q is on {q.device}"))
    if rotation is not None:
        checks.append(
            (
                rotation.shape == (D, D) and rotation.device == q.device,
                "rotation",
                f"must be [{D}, {D}] on {q.device}, got {tuple(rotation.shape)} on "
                f"{rotation.device}",
            )
        )
    for name, t in (
        ("pages", pages.k_codes),
        ("page_table", page_table),
        ("n_pages", n_pages),
        ("dense_k", dense_k),
        ("dense_v", dense_v),
        ("dense_lens", dense_lens),
    ):
        checks.append((t.device == q.device, name, f"is on {t.device}, q is on {q.device}"))
    for name, t in (
        ("q", q),
        ("page_table", page_table),
        ("dense_k", dense_k),
        ("dense_v", dense_v),
    ):
        checks.append(
            (
                t.numel() == 0 or t.stride(-1) == 1,
                name,
                f"needs a contiguous last dim, strides {t.stride()}",
            )
        )
    checks += [
        (
            isinstance(scale, (int, float)) and not isinstance(scale, bool),
            "scale",
            f"must be a python float, got {type(scale).__name__}",
        ),
        (
            isinstance(n_sink, int) and 0 <= n_sink <= P,
            "n_sink",
            f"must be an int in [0, {P}], got {n_sink!r}",
        ),
        (
            isinstance(num_splits, int) and not isinstance(num_splits, bool) and num_splits >= 1,
            "num_splits",
            f"must be an int >= 1, got {num_splits!r}",
        ),
    ]
    if out is not None:
        checks.append(
            (
                out.shape == q.shape
                and out.dtype == q.dtype
                and out.device == q.device
                and (out.numel() == 0 or out.stride(-1) == 1),
                "out",
                f"must match q ({tuple(q.shape)}, {q.dtype}, {q.device}, contiguous last dim)",
            )
        )
    for ok, name, msg in checks:
        if not ok:
            raise ValueError(f"{name}: {msg}")
    return B, H, KVH, P, D
