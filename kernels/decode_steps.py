"""Triton building blocks shared by the compressed decode kernels (fp8, kivi, lowrank) and the
baseline prefill kernel: one online-softmax step, the dense 16-bit tail (sinks + open page) attended by the last split, and the
page range a split owns. Called from other @triton.jit kernels, where Triton inlines them."""

import triton
import triton.language as tl


@triton.jit
def _online_softmax_step(q, k, v, ok, m_i, l_i, acc, qk_scale, DOT_PREC: tl.constexpr):
    """One flash-decoding step: q [GP, D], k [N, D], v [N, DV] (q's dtype), ok [N] valid tokens
    (>= 1 is True); m_i, l_i [GP] and acc [GP, DV] fp32, log2 domain."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [GP, N], log2 domain
    return _softmax_update(s, v, ok[None, :], m_i, l_i, acc, DOT_PREC)


@triton.jit
def _softmax_update(s, v, vis, m_i, l_i, acc, DOT_PREC: tl.constexpr):
    """Fold scores s [M, N] (scaled, log2 domain) into the running softmax: v [N, DV] in the
    dot dtype, vis [M, N] (or [1, N]) the visible pairs; returns the new m_i, l_i, acc."""
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _dense_tail(
    q,
    dk_row,
    dv_row,
    stride_dkt,
    stride_dvt,
    n_tokens,
    offs_d,
    d_ok,
    offs_v,
    v_ok,
    m_i,
    l_i,
    acc,
    qk_scale,
    DENSE_BLOCK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Attend n_tokens 16-bit tail tokens, DENSE_BLOCK at a time. dk_row / dv_row: the tail of
    this (sequence, kv head), token t at + t * stride_*t; offs_d [BD] K channels with d_ok [BD]
    the real ones (BD: the padded head_dim, kernels/head_dim.py), offs_v [DV] V channels with
    v_ok [DV] the real ones (V may be narrower: a projected lowrank V)."""
    offs_t = tl.arange(0, DENSE_BLOCK)
    for start in range(0, n_tokens, DENSE_BLOCK):
        t = start + offs_t
        t_ok = t < n_tokens
        dk = tl.load(
            dk_row + t[:, None] * stride_dkt + offs_d[None, :],
            mask=t_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(q.dtype)  # [T, BD]
        dv = tl.load(
            dv_row + t[:, None] * stride_dvt + offs_v[None, :],
            mask=t_ok[:, None] & v_ok[None, :],
            other=0.0,
        ).to(q.dtype)  # [T, DV]
        m_i, l_i, acc = _online_softmax_step(q, dk, dv, t_ok, m_i, l_i, acc, qk_scale, DOT_PREC)
    return m_i, l_i, acc


@triton.jit
def _split_pages(n_pages, split, NUM_SPLITS: tl.constexpr, NP: tl.constexpr):
    """[lo, hi): the pages split `split` attends of a sequence's n_pages, in whole steps of NP
    pages (splits own contiguous step ranges; the last ones may own none)."""
    steps_per_split = tl.cdiv(tl.cdiv(n_pages, NP), NUM_SPLITS)
    lo = split * steps_per_split * NP
    hi = tl.minimum(lo + steps_per_split * NP, n_pages)
    return lo, hi
