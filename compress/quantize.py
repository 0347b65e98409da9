"""Asymmetric integer quantization of KV pages in torch (used by the KIVI codec; HACK has its own
Triton encoder in kernels/hack_encode.py with the same rounding rules).

x ~= scale * code + min, code = clamp(floor((x - min) / scale + 0.5), 0, 2^b - 1); scale and min
are stored as float16 and the codes are computed with the stored values.

The range [lo, hi] a group is quantized over (scale = (hi - lo) / qmax, min = lo) is its [min, max],
or with a clipping search (`clip` > 0, `clip_range`, issue 19) the best of clip shrunk ranges
[lo + t r, hi - t r] (r = hi - lo, t = j * CLIP_STEP, j = 1 .. clip) and [min, max] itself: the
one of least squared reconstruction error over the group, computed as stored (fp16 scale / min,
codes rounded and clamped; the first at a tie). HACK's encoder (kernels/hack_encode.py) runs the
same rule, its torch reference through `clip_range`. KIVI's default is clip = 0 (its paper's
min/max).
"""

from __future__ import annotations

import torch

CLIP_STEP = 0.025
"""Shrink of a group's range per clipping candidate, on each side (6 steps: down to 0.7 x)."""
MAX_CLIP = 19
"""At most this many candidates: t < 0.5, a candidate range never inverts."""


def check_clip(clip) -> int:
    """clip as an int in [0, MAX_CLIP]; ValueError naming it otherwise."""
    if isinstance(clip, bool) or not isinstance(clip, int) or not 0 <= clip <= MAX_CLIP:
        raise ValueError(f"clip must be an int in [0, {MAX_CLIP}], got {clip!r}")
    return clip


def _fake_quant(x, lo, hi, qmax):
    """(codes as fp32, scale, min) of x over the range lo / hi, scale / min fp16-rounded fp32."""
    sc = ((hi - lo) / qmax).half().float()
    mn = lo.half().float()
    ok = sc > 0
    y = torch.where(ok, (x - mn) / torch.where(ok, sc, torch.ones_like(sc)), torch.zeros_like(x))
    return torch.floor(y + 0.5).clamp(0, qmax), sc, mn


def clip_range(x: torch.Tensor, dim: int, qmax: int, clip: int) -> tuple[torch.Tensor, ...]:
    """The range (lo, hi) each group of x (fp32, groups reduced over `dim`) is quantized over,
    `dim` kept as size 1: [min, max] when clip = 0, else the clipping search (module doc)."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    if clip == 0:
        return lo, hi

    def err(a, b):
        q, sc, mn = _fake_quant(x, a, b, qmax)
        return (q * sc + mn - x).square().sum(dim, keepdim=True)

    r = hi - lo
    best, blo, bhi = err(lo, hi), lo, hi
    for j in range(1, clip + 1):
        t = j * CLIP_STEP
        clo, chi = lo + t * r, hi - t * r
        e = err(clo, chi)
        better = e < best
        best = torch.where(better, e, best)
        blo, bhi = torch.where(better, clo, blo), torch.where(better, chi, bhi)
    return blo, bhi


def quantize_groups(
    x: torch.Tensor, bits: int, dim: int, clip: int = 0
) -> tuple[torch.Tensor, ...]:
    """Quantize x over `dim` (the group axis, reduced); returns (codes uint8 like x, scale, min)
    where scale/min are float16 with `dim` kept as size 1. clip: the clipping search's
    candidates (module doc; 0: each group's min / max)."""
    qmax = (1 << bits) - 1
    xf = x.float()
    lo, hi = clip_range(xf, dim, qmax, check_clip(clip))
    scale = ((hi - lo) / qmax).half()
    mn = lo.half()
    s32, m32 = scale.float(), mn.float()
    ok = s32 > 0
    codes = torch.where(ok, (xf - m32) / torch.where(ok, s32, 1.0), 0.0)
    codes = torch.floor(codes + 0.5).clamp_(0, qmax).to(torch.uint8)
    return codes, scale, mn


def k_per_channel(k: torch.Tensor, bits: int, token_group: int, clip: int = 0):
    """k [n, KVH, P, D] -> codes [n, KVH, P, D], scale/min [n, KVH, P // token_group, D]."""
    n, h, p, d = k.shape
    g = k.reshape(n, h, p // token_group, token_group, d)
    codes, scale, mn = quantize_groups(g, bits, dim=3, clip=clip)
    return codes.reshape(n, h, p, d), scale.squeeze(3), mn.squeeze(3)


def v_per_token(v: torch.Tensor, bits: int, channel_group: int, clip: int = 0):
    """v [n, KVH, P, D] -> codes [n, KVH, P, D], scale/min [n, KVH, P, D // channel_group]."""
    n, h, p, d = v.shape
    g = v.reshape(n, h, p, d // channel_group, channel_group)
    codes, scale, mn = quantize_groups(g, bits, dim=4, clip=clip)
    return codes.reshape(n, h, p, d), scale.squeeze(4), mn.squeeze(4)


def dequant_k(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """codes [n, KVH, P, D], scale/min [n, KVH, G, D] -> fp32 [n, KVH, P, D]."""
    n, h, p, d = codes.shape
    g = scale.shape[2]
    c = codes.float().reshape(n, h, g, p // g, d)
    return (c * scale.float()[:, :, :, None] + mn.float()[:, :, :, None]).reshape(n, h, p, d)


def dequant_v(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """codes [n, KVH, P, D], scale/min [n, KVH, P, G] -> fp32 [n, KVH, P, D]."""
    n, h, p, d = codes.shape
    g = scale.shape[3]
    c = codes.float().reshape(n, h, p, g, d // g)
    return (c * scale.float()[..., None] + mn.float()[..., None]).reshape(n, h, p, d)
