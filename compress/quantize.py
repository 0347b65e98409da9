"""Asymmetric integer quantization of KV pages in torch (used by the KIVI codec; HACK has its own
Triton encoder in kernels/hack_encode.py with the same rounding rules).

x ~= scale * code + min, code = clamp(floor((x - min) / scale + 0.5), 0, 2^b - 1); scale and min
are stored as float16 and the codes are computed with the stored values.

The range a group is quantized over (scale = (hi - lo) / qmax, min = lo) is its [min, max], or with
a range clip c > 0 (`clip_range`, issue 19) that range shrunk by c of its width on each side,
[lo + c r, hi - c r] with r = hi - lo: values outside saturate at code 0 / qmax. HACK's encoder
(kernels/hack_encode.py) applies the same rule (0.1 at 2 bits by default), its torch reference
through `clip_range`; KIVI's default is 0 (its paper's min/max).
"""

from __future__ import annotations

import torch


def check_clip(clip) -> float:
    """clip as a float in [0, 0.5) (0.5 would leave an empty range); ValueError otherwise."""
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 <= clip < 0.5:
        raise ValueError(f"clip must be a number in [0, 0.5), got {clip!r}")
    return float(clip)


def clip_range(x: torch.Tensor, dim: int, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The range (lo, hi) each group of x (fp32, groups reduced over `dim`) is quantized over,
    `dim` kept as size 1: its [min, max] shrunk by `clip` of its width on each side."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    if clip > 0:
        r = hi - lo
        lo, hi = lo + clip * r, hi - clip * r
    return lo, hi


def quantize_groups(
    x: torch.Tensor, bits: int, dim: int, clip: float = 0.0
) -> tuple[torch.Tensor, ...]:
    """Quantize x over `dim` (the group axis, reduced); returns (codes uint8 like x, scale, min)
    where scale/min are float16 with `dim` kept as size 1. clip: the range clip (module doc;
    0: each group's min / max)."""
    qmax = (1 << bits) - 1
    xf = x.float()
    lo, hi = clip_range(xf, dim, check_clip(clip))
    scale = ((hi - lo) / qmax).half()
    mn = lo.half()
    s32, m32 = scale.float(), mn.float()
    ok = s32 > 0
    codes = torch.where(ok, (xf - m32) / torch.where(ok, s32, 1.0), 0.0)
    codes = torch.floor(codes + 0.5).clamp_(0, qmax).to(torch.uint8)
    return codes, scale, mn


def k_per_channel(k: torch.Tensor, bits: int, token_group: int, clip: float = 0.0):
    """k [n, KVH, P, D] -> codes [n, KVH, P, D], scale/min [n, KVH, P // token_group, D]."""
    n, h, p, d = k.shape
    g = k.reshape(n, h, p // token_group, token_group, d)
    codes, scale, mn = quantize_groups(g, bits, dim=3, clip=clip)
    return codes.reshape(n, h, p, d), scale.squeeze(3), mn.squeeze(3)


def v_per_token(v: torch.Tensor, bits: int, channel_group: int, clip: float = 0.0):
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
