"""Folds the low-rank codec's V basis into W_o at load time, so attention outputs need no lift.

With the `lowrank*` codecs V lives in its *completed* basis (compress/lowrank.py): T = [v_enc | C]
[D, D] per KV head, whose first r_v columns are the calibrated v_enc and whose inverse has v_dec^T
as its first r_v rows (`complete_basis`). Pages hold the first r_v coordinates v @ v_enc; the 16-bit
open page and sinks hold all D, v @ T (exact). Every attention output is therefore o_T [T, H, D] in
that basis (pages add to its first r_v columns only), standing for o[t, h] = o_T[t, h] @ T^-1 =
o_T[t, h] @ v_dec_full[g(h)]^T, g(h) = h // G the KV head of query head h (G = H / KVH query heads
per KV head, heads grouped consecutively). o_proj computes y[t] = sum_h o[t, h] @ W_o[:, h-slice]^T,
so

    y[t] = sum_h o_T[t, h] @ (W_o[:, h*D:(h+1)*D] @ v_dec_full[g(h)])^T
                              \\__ [hidden, D] @ [D, D] = [hidden, D] __/

and the folded weight W_f[:, h*D:(h+1)*D] = W_o[:, h-slice] @ v_dec_full[g(h)] replaces o_proj: the
same size as W_o, no lift. (`folded_o_weight` takes any [KVH, D, r] decode basis: r_v columns fold
a reduced output, as before V's basis was completed.) The product is taken in float64 and rounded
once to the model's dtype.

`LiftedOProj` is the unfolded reference with the same interface: it lifts o_T back through
v_dec_full^T every step and applies the original W_o (tests hold the folded model against it).

K has no counterpart: keys are projected after RoPE, and RoPE rotates by position, so Bk cannot be
folded into W_k / W_q; q is projected after RoPE instead (LowRankLayerCodec._project_query).
"""

from __future__ import annotations

import torch
from torch import nn


def complete_basis(enc: torch.Tensor, dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """enc, dec [KVH, D, r] with dec^T enc = I_r -> (enc_full, dec_full) [KVH, D, D] float32,
    their first r columns enc and dec, with dec_full^T enc_full = I_D: enc_full = [enc | C] with C
    an orthonormal basis of the complement of span(dec) (so dec^T C = 0), dec_full = [dec |
    (I - dec enc^T) C]. Computed in float64."""
    e, d = enc.double(), dec.double()
    kvh, dim, r = e.shape
    if r == dim:
        return enc.float().contiguous(), dec.float().contiguous()
    q, _ = torch.linalg.qr(d, mode="complete")  # [KVH, D, D]
    c = q[:, :, r:]  # [KVH, D, D - r], orthonormal, orthogonal to span(dec)
    eye = torch.eye(dim, dtype=torch.float64, device=e.device)
    dc = (eye - d @ e.transpose(1, 2)) @ c  # [KVH, D, D - r]
    return (
        torch.cat([e, c], 2).float().contiguous(),
        torch.cat([d, dc], 2).float().contiguous(),
    )


def folded_o_weight(w_o: torch.Tensor, v_dec: torch.Tensor) -> torch.Tensor:
    """W_o [hidden, H*D] and a decode basis v_dec [KVH, D, r] -> W_f [hidden, H*r] (float64)."""
    hidden, hd = w_o.shape
    kvh, d, rv = v_dec.shape
    h = hd // d
    w = w_o.double().view(hidden, kvh, h // kvh, d)  # [hidden, KVH, G, D]
    wf = torch.einsum("xkgd,kdr->xkgr", w, v_dec.double().to(w_o.device))  # [hidden, KVH, G, r]
    return wf.reshape(hidden, h * rv)


class LiftedOProj(nn.Module):
    """Reference (unfolded): o [T, H*r] -> lift per head through v_dec^T [KVH, D, r] -> W_o."""

    def __init__(self, o_proj: nn.Linear, v_dec: torch.Tensor):
        super().__init__()
        self.o_proj = o_proj
        self.register_buffer("v_dec", v_dec.float(), persistent=False)  # [KVH, D, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kvh, d, rv = self.v_dec.shape
        t = x.shape[0]
        h = x.shape[1] // rv
        o = torch.einsum(
            "tkgr,kdr->tkgd", x.float().view(t, kvh, h // kvh, rv), self.v_dec.to(x.device)
        )  # [T, KVH, G, D]
        return self.o_proj(o.reshape(t, h * d).to(x.dtype))


def apply_lowrank_output(model: nn.Module, codec, fold: bool = True) -> None:
    """Make each attention layer of `model` take the codec's output o_T [T, H, D] in V's completed
    basis: o_proj becomes the folded W_f (fold=True) or the lifting reference (fold=False)."""
    layers = model.layers
    if len(layers) != len(codec.layers):
        raise ValueError(
            f"codec: the lowrank bases have {len(codec.layers)} layers, the model {len(layers)}"
        )
    for layer, lc in zip(layers, codec.layers):
        attn = layer.self_attn
        v_dec = lc.v_dec_full  # [KVH, D, D]
        width = v_dec.shape[2]
        old = attn.o_proj
        if fold:
            w = old.weight.detach()
            new = nn.Linear(
                attn.num_heads * width, w.shape[0], bias=False, device=w.device, dtype=w.dtype
            )
            with torch.no_grad():
                new.weight.copy_(folded_o_weight(w, v_dec).to(w.dtype))
            attn.o_proj = new
        else:
            attn.o_proj = LiftedOProj(old, v_dec.to(old.weight.device))
        attn.o_head_dim = width
