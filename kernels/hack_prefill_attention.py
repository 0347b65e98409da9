"""Chunked-prefill attention of one sequence's new tokens over its cached HACK pages.

``hack_prefill_attention`` (Triton kernel + wrapper) and ``hack_prefill_attention_ref`` (torch fp32, same
signature, same math).  Layout of ``pages``: hack_layout.py (P = page_size, E = 8 // bits, DE = D // E,
GV = group_v, NG = D // GV, h = (2^b - 1) / 2).
  q [n, H, D] fp16/bf16/fp32: the chunk's queries (head h uses kv head h // G, G = H // KVH);
  k, v [n, KVH, D] (q's dtype): the chunk's own keys/values, attended causally (query i sees 0..i);
  pages + past_pages [m] int32: the sequence's full quantized pages before the chunk, in order
    (positions [0, m * P)); positions < n_sink of the first page are masked (they live in dense_k);
  dense_k, dense_v [KVH, T, D] (q's dtype): 16-bit past tokens every query sees in full (the sinks,
    and any open-page tokens before a chunk that starts mid-page); T may be 0.
  Returns out [n, H, D] in q's dtype.  Token order inside a set does not matter: RoPE is already in K.

Math: the decode kernel's (hack_decode_kernel.py), nothing dequantized.  Page j, query row r:
  s_rt = sum_c (q_rc sK_jc) k'_tc + q_r . mK_j;  o_rc = sum_t (p_rt sV_tg) v'_tc + sum_t p_rt mV_tg.
  "f16":  q~ = q * sK and p~ = p * sV rounded to fp16, codes exact in fp16, fp32 accumulation.
  "int8": q~ quantized to int8 per (row, page, plane), p~ per (row, page, V group) with zero point -128,
          centred codes and the stored v_sums as the rank-1 correction (formulas in the decode module,
          whose _v_group / _v_plane / _unpack this kernel calls).
The chunk's K/V and dense_k/v take a plain 16-bit flash-attention path.  One online softmax covers all
three sets, so no LSE merge is needed.

The Triton kernel: hack_prefill_kernel.py.
"""

import torch
import triton

from zipserve.kernels.arg_checks import FLOAT_DTYPES, is_pow2
from zipserve.kernels.hack_decode_attention import plane_width
from zipserve.kernels.hack_layout import HackPages, check_bits, unpack_planar
from zipserve.kernels.hack_prefill_kernel import _hack_prefill_kernel
from zipserve.kernels.head_dim import block_d, head_dim_ok
from zipserve.kernels.paged_decode_attention import is_interpreted, require_runnable

__all__ = ["hack_prefill_attention", "hack_prefill_attention_ref", "check_prefill_args"]

_LOG2E = 1.4426950408889634
_MODES = ("f16", "int8")


def check_prefill_args(
    q, k, v, pages, past_pages, dense_k, dense_v, scale, bits, n_sink, mode, out
):
    """Validate hack_prefill_attention(_ref) arguments -> (n, H, KVH, P, D); ValueError names the argument."""
    if not isinstance(pages, HackPages):
        raise ValueError(f"pages: must be a HackPages pool, got {type(pages).__name__}")
    pages.validate()
    if check_bits(bits) != pages.bits:
        raise ValueError(f"bits: {bits} does not match pages.bits={pages.bits}")
    if mode not in _MODES:
        raise ValueError(f"mode: must be one of {_MODES}, got {mode!r}")
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"q: must be [n, num_heads, head_dim] of {FLOAT_DTYPES}, got "
            f"{getattr(q, 'dtype', type(q).__name__)} {tuple(getattr(q, 'shape', ()))}"
        )
    (n, H, D), KVH, P, E = q.shape, pages.num_kv_heads, pages.page_size, 8 // pages.bits
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
            isinstance(past_pages, torch.Tensor)
            and past_pages.dtype == torch.int32
            and past_pages.dim() == 1
            and past_pages.is_contiguous(),
            "past_pages",
            f"must be a contiguous int32 [m] tensor, got {getattr(past_pages, 'dtype', type(past_pages).__name__)}"
            f" {tuple(getattr(past_pages, 'shape', ()))}",
        ),
    ]
    for name, t in (("k", k), ("v", v)):
        checks.append(
            (
                isinstance(t, torch.Tensor)
                and t.dtype == q.dtype
                and tuple(t.shape) == (n, KVH, D),
                name,
                f"must be {q.dtype} [n={n}, KVH={KVH}, D={D}], got "
                f"{getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}",
            )
        )
    for name, t in (("dense_k", dense_k), ("dense_v", dense_v)):
        checks.append(
            (
                isinstance(t, torch.Tensor)
                and t.dtype == q.dtype
                and t.dim() == 3
                and t.shape == dense_k.shape
                and t.shape[0] == KVH
                and t.shape[2] == D,
                name,
                f"must be {q.dtype} [KVH={KVH}, T, D={D}] (same for k and v), got "
                f"{getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}",
            )
        )
    for ok, name, msg in checks:
        if not ok:
            raise ValueError(f"{name}: {msg}")
    checks = []
    for name, t in (
        ("pages", pages.k_codes),
        ("past_pages", past_pages),
        ("k", k),
        ("v", v),
        ("dense_k", dense_k),
        ("dense_v", dense_v),
    ):
        checks.append((t.device == q.device, name, f"is on {t.device}, q is on {q.device}"))
    for name, t in (("q", q), ("k", k), ("v", v), ("dense_k", dense_k), ("dense_v", dense_v)):
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
            isinstance(n_sink, int) and not isinstance(n_sink, bool) and 0 <= n_sink <= P,
            "n_sink",
            f"must be an int in [0, {P}], got {n_sink!r}",
        ),
    ]
    if out is not None:
        checks.append(
            (
                isinstance(out, torch.Tensor)
                and out.shape == q.shape
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
    return n, H, KVH, P, D


def _launch_config(group: int) -> tuple[int, int, int]:
    """Fixed heuristic (no autotune) -> (BT tokens per program, GP padded group, num_warps): M = 64 rows."""
    gp = triton.next_power_of_2(group)
    bt = max(1, 64 // gp)
    return bt, gp, 4


def hack_prefill_attention(
    q, k, v, pages, past_pages, dense_k, dense_v, scale, bits, n_sink=4, mode="f16", out=None
):
    """Chunk attention over HACK pages + dense past + itself (causal).  Shapes: module docstring."""
    n, H, KVH, P, D = check_prefill_args(
        q, k, v, pages, past_pages, dense_k, dense_v, scale, bits, n_sink, mode, out
    )
    require_runnable("hack_prefill_attention", _hack_prefill_kernel, q)
    if out is None:
        out = torch.empty_like(q)
    if n == 0 or H == 0:
        return out
    G = H // KVH
    bt, gp, num_warps = _launch_config(G)
    _hack_prefill_kernel[(triton.cdiv(n, bt), KVH)](
        q,
        k,
        v,
        pages.k_codes,
        pages.v_codes,
        pages.k_scale,
        pages.k_min,
        pages.v_scale,
        pages.v_min,
        pages.v_sums,
        past_pages,
        dense_k,
        dense_v,
        out,
        n,
        past_pages.numel(),
        dense_k.shape[1],
        float(scale) * _LOG2E,
        n_sink,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        dense_k.stride(0),
        dense_k.stride(1),
        dense_v.stride(0),
        dense_v.stride(1),
        out.stride(0),
        out.stride(1),
        G=G,
        GP=gp,
        BT=bt,
        PAGE=P,
        HEAD_DIM=D,
        BLOCK_D=block_d(D),
        DEP=plane_width(D, pages.bits),
        BITS=pages.bits,
        GV=pages.group_v,
        INT8=mode == "int8",
        INT8_QK_DOT=plane_width(D, pages.bits) >= 32,
        DENSE_BLOCK=64,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        FAST=q.is_cuda and torch.version.hip is None and not is_interpreted(_hack_prefill_kernel),
        num_warps=num_warps,
        num_stages=2,
    )
    return out


def hack_prefill_attention_ref(
    q, k, v, pages, past_pages, dense_k, dense_v, scale, bits, n_sink=4, mode="f16", out=None
):
    """Torch fp32 reference: the kernel's math and int8 roundings (fp16 roundings of the f16 mode skipped)."""
    n, H, KVH, P, D = check_prefill_args(
        q, k, v, pages, past_pages, dense_k, dense_v, scale, bits, n_sink, mode, out
    )
    G, E, GV = H // KVH, 8 // pages.bits, pages.group_v
    DE, NG = D // E, D // GV
    qk, half = float(scale) * _LOG2E, ((1 << pages.bits) - 1) / 2.0
    qf = q.float().view(n, KVH, G, D).permute(1, 0, 2, 3) * qk  # [KVH, n, G, D] log2 domain
    ids = past_pages.long()
    m = ids.numel()
    kc = unpack_planar(pages.k_codes[ids], pages.bits).float()  # [m, KVH, P, D]
    ks, km = pages.k_scale[ids].float(), pages.k_min[ids].float()  # [m, KVH, D]
    s_pages = []
    for j in range(m):  # one page at a time keeps the reference's memory O(n H P)
        qt = qf * ks[j, :, None, None, :]  # q~ [KVH, n, G, D]
        if mode == "int8":
            qt5 = qt.view(KVH, n, G, E, DE)
            sig = qt5.abs().amax(-1) / 127.0  # [KVH, n, G, E]
            q8 = torch.floor(qt5 / torch.where(sig > 0, sig, 1.0)[..., None] + 0.5)
            d = torch.einsum("kngec,kpec->kngpe", q8, kc[j].view(KVH, P, E, DE) - half)
            s = (d * sig[:, :, :, None, :]).sum(-1) + half * qt.sum(-1)[..., None]  # [KVH, n, G, P]
        else:
            s = torch.einsum("kngd,kpd->kngp", qt, kc[j])
        s_pages.append(s + (qf * km[j, :, None, None, :]).sum(-1)[..., None])
    sq = torch.stack(s_pages, 3) if m else qf.new_zeros(KVH, n, G, 0, P)  # [KVH, n, G, m, P]
    if m and n_sink:
        sq[:, :, :, 0, :n_sink] = float("-inf")  # sinks are attended through dense_k
    sd = torch.einsum("kngd,ktd->kngt", qf, dense_k.float())  # [KVH, n, G, T]
    sc = torch.einsum("kngd,tkd->kngt", qf, k.float())  # [KVH, n, G, n]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    sc = sc.masked_fill(~causal[None, :, None, :], float("-inf"))
    mx = torch.cat([sq.flatten(3), sd, sc], -1).amax(-1)  # [KVH, n, G]
    pq = torch.exp2(sq - mx[..., None, None])  # [KVH, n, G, m, P]
    pd, pc = torch.exp2(sd - mx[..., None]), torch.exp2(sc - mx[..., None])
    l = pq.sum((3, 4)) + pd.sum(-1) + pc.sum(-1)  # noqa: E741  [KVH, n, G]
    o = torch.einsum("kngt,ktd->kngd", pd, dense_v.float()) + torch.einsum(
        "kngt,tkd->kngd", pc, v.float()
    )
    for j in range(m):
        vc = unpack_planar(pages.v_codes[ids[j]], pages.bits).float().view(KVH, P, NG, GV)
        vs, vm = pages.v_scale[ids[j]].float(), pages.v_min[ids[j]].float()  # [KVH, P, NG]
        pj = pq[:, :, :, j]  # [KVH, n, G, P]
        pt = pj[..., None] * vs[:, None, None]  # p~ [KVH, n, G, P, NG]
        vmt = (pj[..., None] * vm[:, None, None]).sum(3)  # [KVH, n, G, NG]
        if mode == "int8":
            sig = pt.amax(3) / 255.0  # [KVH, n, G, NG]
            p8 = (
                torch.floor(pt / torch.where(sig > 0, sig, 1.0)[:, :, :, None] + 0.5).clamp_max(255)
                - 128
            )
            d = torch.einsum("kngpj,kpjc->kngjc", p8, vc)  # [KVH, n, G, NG, GV]
            vsum = pages.v_sums[ids[j]].float().view(KVH, 1, 1, NG, GV)
            cent = d - half * p8.sum(3)[..., None] + 128.0 * (vsum - P * half)
            oq = sig[..., None] * cent + (half * pt.sum(3) + vmt)[..., None]
        else:
            oq = torch.einsum("kngpj,kpjc->kngjc", pt, vc) + vmt[..., None]
        o = o + oq.reshape(KVH, n, G, D)
    res = (o / l[..., None]).permute(1, 0, 2, 3).reshape(n, H, D)
    if out is None:
        return res.to(q.dtype)
    out.copy_(res)
    return out
