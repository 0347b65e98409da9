"""The model's forward over one rank's token slice, with Ulysses sequence-parallel attention.

Every rank holds the whole model and a contiguous, page-aligned slice of the prompt. Per layer:
qkv projection and RoPE (global positions) on the slice -> all-to-all 'qkv' turns the token split
into a head split (H/N query heads, their kv heads, over the full sequence) -> causal attention
-> all-to-all 'out' turns it back -> o_proj, MLP on the slice. With low-rank bases (ZeroC) q, k, v
are projected onto the calibrated per-kv-head bases before 'qkv' (q @ k_dec, k @ k_enc,
v @ v_enc), attention runs in the reduced dimension, 'out' carries the r_v-dim outputs, and they
are lifted through v_dec after it; the exchanges then move r instead of head_dim per head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from zipserve.compress.lowrank_bases import LowRankBases
from zipserve.engine.attention import prefill_attention
from zipserve.engine.model import LlamaModel
from zipserve.prefill_group.exchange import Exchange
from zipserve.prefill_group.plan import HeadSplit, TokenSlice


@dataclass
class RankContext:
    rank: int
    split: HeadSplit
    slices: list[TokenSlice]
    exchange: Exchange

    @property
    def me(self) -> TokenSlice:
        return self.slices[self.rank]


KVHook = Callable[[int, torch.Tensor, torch.Tensor], None]
"""(layer, k [t, KVH, D], v [t, KVH, D]) of this rank's slice, post-RoPE, full dimension."""


def _pack(parts: list[torch.Tensor]) -> torch.Tensor:
    """[t, h_i, d_i] tensors -> [t, sum(h_i*d_i)]."""
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=-1)


def _unpack(x: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """[T, W] -> [T, h_i, d_i] for each (h_i, d_i)."""
    cols = x.split([h * d for h, d in shapes], dim=-1)
    return [c.reshape(x.shape[0], h, d) for c, (h, d) in zip(cols, shapes)]


def exchange_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: RankContext, layer: int, scale: float
) -> torch.Tensor:
    """q [t, H, dq], k [t, KVH, dq], v [t, KVH, dv] of this rank's tokens -> attention output
    [t, H, dv] of the same tokens, the full causal sequence attended across the group."""
    sp, n, t = ctx.split, ctx.split.n, q.shape[0]
    dq, dv = q.shape[-1], v.shape[-1]
    shapes = [(sp.q_per_rank, dq), (sp.kv_per_rank, dq), (sp.kv_per_rank, dv)]
    width = sum(h * d for h, d in shapes)
    send = torch.stack(
        [_pack([q[:, sp.q_heads(j)], k[:, sp.kv_heads(j)], v[:, sp.kv_heads(j)]]) for j in range(n)]
    )  # [N, t, W]
    lens = [s.length for s in ctx.slices]
    recv = ctx.exchange.all_to_all(
        send.flatten(), [t * width] * n, [m * width for m in lens], "qkv", layer
    )
    full = recv.view(sum(lens), width)  # [T, W], rank order == token order
    qh, kh, vh = _unpack(full, shapes)  # [T, H/N, dq], [T, kvn, dq], [T, kvn, dv]
    o = _attend(qh, kh, vh, scale)  # [T, H/N, dv]
    back = ctx.exchange.all_to_all(
        o.reshape(-1),
        [m * sp.q_per_rank * dv for m in lens],
        [t * sp.q_per_rank * dv] * n,
        "out",
        layer,
    )
    return back.view(n, t, sp.q_per_rank, dv).transpose(0, 1).reshape(t, sp.num_heads, dv)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention over the whole sequence. On GPU, reduced dims that differ between q/k
    and v or are not multiples of 8 are zero-padded to one width (outside the exchange) so the
    fused SDPA kernels apply instead of the O(T^2)-memory math path; zeros change no score and
    the padded output columns are dropped."""
    dq, dv = q.shape[-1], v.shape[-1]
    width = -(-max(dq, dv) // 8) * 8
    if not q.is_cuda or dq == dv == width:
        return prefill_attention(q, k, v, [q.shape[0]], scale)
    pad = torch.nn.functional.pad
    o = prefill_attention(
        pad(q, (0, width - dq)),
        pad(k, (0, width - dq)),
        pad(v, (0, width - dv)),
        [q.shape[0]],
        scale,
    )
    return o[..., :dv]


class _Reducer:
    """One layer's low-rank bases expanded to query heads: project before, lift after."""

    def __init__(self, bases: dict[str, torch.Tensor], group: int, device: torch.device):
        self.k_dec = bases["k_dec"].float().to(device).repeat_interleave(group, 0)  # [H, D, rk]
        self.v_dec = bases["v_dec"].float().to(device).repeat_interleave(group, 0)  # [H, D, rv]
        self.k_enc = bases["k_enc"].float().to(device)  # [KVH, D, rk]
        self.v_enc = bases["v_enc"].float().to(device)  # [KVH, D, rv]

    def project(self, q, k, v):
        dt = q.dtype
        return (
            torch.einsum("thd,hdr->thr", q.float(), self.k_dec).to(dt),
            torch.einsum("thd,hdr->thr", k.float(), self.k_enc).to(dt),
            torch.einsum("thd,hdr->thr", v.float(), self.v_enc).to(dt),
        )

    def lift(self, o_red: torch.Tensor) -> torch.Tensor:  # [t, H, rv] -> [t, H, D]
        return torch.einsum("thr,hdr->thd", o_red.float(), self.v_dec).to(o_red.dtype)


@torch.inference_mode()
def ulysses_prefill(
    model: LlamaModel,
    input_ids: torch.Tensor,
    ctx: RankContext,
    bases: LowRankBases | None = None,
    on_kv: KVHook | None = None,
    all_logits: bool = False,
) -> torch.Tensor | None:
    """This rank's part of the prefill of one prompt. input_ids: [t] this rank's slice.
    Returns fp32 logits: [1, V] of the prompt's last token on the last rank (None elsewhere),
    or [t, V] of every token of the slice on every rank when all_logits."""
    cfg, me = model.config, ctx.me
    if input_ids.shape[0] != me.length:
        raise ValueError(f"rank {ctx.rank}: {input_ids.shape[0]} tokens for a slice of {me.length}")
    if bases is not None and len(bases.layers) != cfg.num_layers:
        raise ValueError(
            f"low-rank bases have {len(bases.layers)} layers, the model {cfg.num_layers}"
        )
    group = cfg.num_heads // cfg.num_kv_heads
    positions = torch.arange(me.start, me.end, device=input_ids.device)
    x = model.embed_tokens(input_ids)  # [t, hidden]
    t = x.shape[0]
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        qkv = attn.qkv_proj(layer.input_layernorm(x))  # [t, q + 2kv]
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q = q.view(t, cfg.num_heads, cfg.head_dim)
        k = k.view(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(t, cfg.num_kv_heads, cfg.head_dim)
        q, k = model.rope(positions, q, k)
        if on_kv is not None:
            on_kv(i, k, v)
        if bases is None:
            o = exchange_attention(q, k, v, ctx, i, attn.scale)  # [t, H, D]
        else:
            red = _Reducer(bases.layers[i], group, x.device)
            o = red.lift(exchange_attention(*red.project(q, k, v), ctx, i, attn.scale))
        x = x + attn.o_proj(o.reshape(t, attn.q_size))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    if all_logits:
        return model.lm_head(model.norm(x)).float()
    if ctx.rank != len(ctx.slices) - 1:
        return None
    return model.lm_head(model.norm(x[-1:])).float()
