"""Folds the low-rank codec's V basis into W_o at load time, so attention outputs stay reduced.

With the `lowrank*` codecs every attention output is o_red [T, H, r_v] (compress/lowrank.py), the
full-dimension output it stands for being o[t, h] = o_red[t, h] @ v_dec[g(h)]^T, g(h) = h // G the
KV head of query head h (G = H / KVH query heads per KV head, heads grouped consecutively).
o_proj computes y[t] = sum_h o[t, h] @ W_o[:, h*D:(h+1)*D]^T, so

    y[t] = sum_h o_red[t, h] @ (W_o[:, h*D:(h+1)*D] @ v_dec[g(h)])^T
                               \\__ [hidden, D] @ [D, r_v] = [hidden, r_v] __/

and the folded weight is W_f[:, h*r_v:(h+1)*r_v] = W_o[:, h-slice] @ v_dec[g(h)], W_f [hidden, H*r_v].
It replaces o_proj (W_o itself is dropped): one matmul of H*r_v instead of H*D inputs, and no lift.
The product is taken in float64 and rounded once to the model's dtype.

`lift_o_proj` is the unfolded reference with the same interface: it lifts o_red back through
v_dec^T every step and applies the original W_o (what the codec did before folding; tests hold the
folded model against it).

K has no counterpart: keys are projected after RoPE, and RoPE rotates by position, so Bk cannot be
folded into W_k / W_q; q is projected after RoPE instead (LowRankLayerCodec._project_query).
"""

from __future__ import annotations

import torch
from torch import nn


def folded_o_weight(w_o: torch.Tensor, v_dec: torch.Tensor) -> torch.Tensor:
    """W_o [hidden, H*D] and v_dec [KVH, D, r_v] -> W_f [hidden, H*r_v] (float64)."""
    hidden, hd = w_o.shape
    kvh, d, rv = v_dec.shape
    h = hd // d
    w = w_o.double().view(hidden, kvh, h // kvh, d)  # [hidden, KVH, G, D]
    wf = torch.einsum("xkgd,kdr->xkgr", w, v_dec.double().to(w_o.device))  # [hidden, KVH, G, r_v]
    return wf.reshape(hidden, h * rv)


class LiftedOProj(nn.Module):
    """Reference (unfolded): o_red [T, H*r_v] -> lift per head through v_dec^T -> original W_o."""

    def __init__(self, o_proj: nn.Linear, v_dec: torch.Tensor):
        super().__init__()
        self.o_proj = o_proj
        self.register_buffer("v_dec", v_dec.float(), persistent=False)  # [KVH, D, r_v]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kvh, d, rv = self.v_dec.shape
        t = x.shape[0]
        h = x.shape[1] // rv
        o = torch.einsum(
            "tkgr,kdr->tkgd", x.float().view(t, kvh, h // kvh, rv), self.v_dec.to(x.device)
        )  # [T, KVH, G, D]
        return self.o_proj(o.reshape(t, h * d).to(x.dtype))


def apply_lowrank_output(model: nn.Module, codec, fold: bool = True) -> None:
    """Make each attention layer of `model` take the codec's reduced output o_red [T, H, r_v]:
    o_proj becomes the folded W_f (fold=True) or the lifting reference (fold=False)."""
    layers = model.layers
    if len(layers) != len(codec.layers):
        raise ValueError(
            f"codec: the lowrank bases have {len(codec.layers)} layers, the model {len(layers)}"
        )
    for layer, lc in zip(layers, codec.layers):
        attn = layer.self_attn
        v_dec = lc._bases_cpu["v_dec"]  # [KVH, D, r_v]
        old = attn.o_proj
        if fold:
            w = old.weight.detach()
            new = nn.Linear(
                attn.num_heads * lc.rv, w.shape[0], bias=False, device=w.device, dtype=w.dtype
            )
            with torch.no_grad():
                new.weight.copy_(folded_o_weight(w, v_dec).to(w.dtype))
            attn.o_proj = new
        else:
            attn.o_proj = LiftedOProj(old, v_dec.to(old.weight.device))
        attn.o_head_dim = lc.rv
