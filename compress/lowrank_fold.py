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


def fold_v_projection(qkv_proj: nn.Linear, v_enc_full: torch.Tensor, q_size: int) -> nn.Linear:
    """A copy of qkv_proj whose V rows (and bias) produce v @ T, V in its completed basis, instead
    of v (a new module, like o_proj's fold: weights another engine may share are not touched). Per
    KV head h: W_v'[h] = T[h]^T W_v[h] ([D, D] @ [D, hidden]), b_v'[h] = b_v[h] T[h]; taken in
    float64, rounded once to the weight's dtype. v_enc_full T [KVH, D, D]."""
    kvh, d, _ = v_enc_full.shape
    w = qkv_proj.weight.detach()
    t = v_enc_full.double().to(w.device)
    v_rows = slice(q_size + kvh * d, q_size + 2 * kvh * d)
    new = nn.Linear(
        w.shape[1], w.shape[0], bias=qkv_proj.bias is not None, device=w.device, dtype=w.dtype
    )
    with torch.no_grad():
        new.weight.copy_(w)
        folded = torch.einsum("kde,kdx->kex", t, w[v_rows].double().view(kvh, d, -1))
        new.weight[v_rows] = folded.reshape(kvh * d, -1).to(w.dtype)
        if qkv_proj.bias is not None:
            b = qkv_proj.bias.detach()
            new.bias.copy_(b)
            fb = torch.einsum("kde,kd->ke", t, b[v_rows].double().view(kvh, d))
            new.bias[v_rows] = fb.reshape(-1).to(b.dtype)
    return new


def apply_lowrank_output(model: nn.Module, codec, fold: bool = True) -> None:
    """Make each attention layer of `model` take the codec's output o_T [T, H, D] in V's completed
    basis: o_proj becomes the folded W_f (fold=True) or the lifting reference (fold=False). With
    fold, V's basis T also goes into qkv_proj's V rows (the projection emits v @ T, so the codec's
    to_dense has nothing left to do: one matmul less per layer and step) and each layer codec is
    told so (`v_folded`)."""
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
            attn.qkv_proj = fold_v_projection(attn.qkv_proj, lc.v_enc_full, attn.q_size)
            lc.v_folded = True
        else:
            attn.o_proj = LiftedOProj(old, v_dec.to(old.weight.device))
        attn.o_head_dim = width
