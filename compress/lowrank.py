"""ZeroC-style low-rank KV: each layer's K and V live projected onto calibrated per-KV-head bases
(post-RoPE for K), optionally quantized further with HACK (`lowrank+hack2/4`).

Everything a query sees is in the reduced space, in prefill and decode alike:
- q is projected after RoPE, q_red = q @ k_dec [.., r_k] (RoPE is position dependent, so Bk cannot
  be folded into W_q for post-RoPE keys; the projection is a D x r_k product per query head).
- K and V are projected when stored: full pages by the encode kernel (kernels/lowrank_encode.py),
  the 16-bit open page and sinks at write time (`to_dense`), so they hold k @ k_enc and v @ v_enc
  too. The dense buffers keep the model's head_dim width: the first r_k (r_v) columns hold the
  projection, the rest are zeros (exact: zero columns add nothing to q.k nor to the output).
- Attention returns o_red [.., H, r_v] and W_o is replaced at load time by W_o folded with v_dec
  (compress/lowrank_fold.py), so no per-step lift back to head_dim exists.
Pages of layer l hold exactly r_k(l) and r_v(l) float16 columns (or HACK codes of both, zero
padded to one power of two >= 64, whose bytes page_bytes_per_token counts).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from zipserve.compress.codecs import HackCodec, KVCodec
from zipserve.kernels import lowrank_decode_attention as lr_attn
from zipserve.kernels import lowrank_encode


class LowRankBases:
    """Per layer and KV head, [KVH, D, r] matrices: k_enc stores keys (k @ k_enc), k_dec projects
    queries (q @ k_dec) so that q_red . k_red ~= q . k; v_enc stores values, v_dec lifts the
    reduced attention output back (o_red @ v_dec^T)."""

    def __init__(self, layers: list[dict[str, torch.Tensor]], info: dict):
        self.layers, self.info = layers, info

    @classmethod
    def load(cls, model_dir: str | Path) -> "LowRankBases":
        path = Path(model_dir) / "lowrank.safetensors"
        if not path.is_file():
            raise ValueError(f"codec: lowrank needs {path}; create it with "
                             f"`zipserve calibrate --model {model_dir}`")
        t = load_file(str(path))
        n = len([k for k in t if k.endswith(".k_enc")])
        info_path = Path(model_dir) / "lowrank.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        names = ("k_enc", "k_dec", "v_enc", "v_dec")
        return cls([{m: t[f"layers.{i}.{m}"] for m in names} for i in range(n)], info)

    @classmethod
    def random(cls, num_layers: int, num_kv_heads: int, head_dim: int, rk: int, rv: int,
               seed: int = 0) -> "LowRankBases":
        """Random orthonormal bases (enc == dec) of ranks rk / rv: for benchmarks on random
        weights, where there is nothing to calibrate on."""
        g = torch.Generator().manual_seed(seed)

        def basis(r):  # [KVH, D, r] orthonormal columns
            q, _ = torch.linalg.qr(torch.randn(num_kv_heads, head_dim, head_dim, generator=g,
                                               dtype=torch.float64))
            return q[:, :, :r].float().contiguous()

        layers = []
        for _ in range(num_layers):
            bk, bv = basis(rk), basis(rv)
            layers.append({"k_enc": bk, "k_dec": bk, "v_enc": bv, "v_dec": bv})
        return cls(layers, {"random": True, "k_ranks": [rk] * num_layers,
                            "v_ranks": [rv] * num_layers})


def _pad_pow2(r: int, lo: int = 64) -> int:
    p = lo
    while p < r:
        p *= 2
    return p


class LowRankLayerCodec(KVCodec):
    """One layer's low-rank codec (pages: projected K/V, float16 or HACK codes). Its store, dense
    tail, queries and attention output are all in the reduced space (module docstring)."""

    def __init__(self, name, num_kv_heads, page_size, head_dim, bases: dict[str, torch.Tensor],
                 bits: int | None):
        super().__init__(num_kv_heads, page_size, head_dim)
        self.name, self.bits = name, bits
        self.rk, self.rv = bases["k_enc"].shape[-1], bases["v_enc"].shape[-1]
        self.out_dim = self.rv  # attention output per query head (o_red)
        self._bases_cpu = {n: b.float().contiguous() for n, b in bases.items()}  # [KVH, D, r]
        self._dev: dict[torch.device, dict[str, torch.Tensor]] = {}
        self.inner = None
        if bits is not None:  # HACK on the reduced dims, both padded to one power of two
            self.width = _pad_pow2(max(self.rk, self.rv))
            self.inner = HackCodec(num_kv_heads, page_size, self.width, bits)
            self.n_sink = HackCodec.n_sink

    def _bases(self, device) -> dict[str, torch.Tensor]:
        if device not in self._dev:
            self._dev[device] = {n: b.to(device) for n, b in self._bases_cpu.items()}
        return self._dev[device]

    # -- the reduced space -----------------------------------------------------------------------
    def project_query(self, q: torch.Tensor) -> torch.Tensor:
        """q [T, H, D] (after RoPE) -> q_red zero padded to [T, H, D] (first r_k columns)."""
        t, h, d = q.shape
        k_dec = self._bases(q.device)["k_dec"]  # [KVH, D, r_k]
        qr = torch.einsum("tkgd,kdr->tkgr", q.float().view(t, self.kvh, h // self.kvh, d), k_dec)
        return _width(qr.reshape(t, h, self.rk), d).to(q.dtype)

    def to_dense(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k/v [.., KVH, D] -> their projections zero padded to [.., KVH, D] (open page, sinks)."""
        b = self._bases(k.device)
        d = k.shape[-1]
        kr = torch.einsum("...hd,hdr->...hr", k.float(), b["k_enc"])
        vr = torch.einsum("...hd,hdr->...hr", v.float(), b["v_enc"])
        return _width(kr, d).to(k.dtype), _width(vr, d).to(v.dtype)

    # -- pages -----------------------------------------------------------------------------------
    def new_store(self, num_pages, device):
        shape = (num_pages, self.kvh, self.page_size)
        if self.inner is None:
            return {"k": torch.zeros(*shape, self.rk, dtype=torch.float16, device=device),
                    "v": torch.zeros(*shape, self.rv, dtype=torch.float16, device=device)}
        return self.inner.new_store(num_pages, device)

    def encode(self, store, page_ids, k, v):
        """Full-dimension post-RoPE pages k, v [n, KVH, P, D] -> projected pages (one kernel; for
        lowrank+hack its fp32 output, zero padded to the HACK width, is then quantized)."""
        b = self._bases(k.device)
        fn = (lowrank_encode.lowrank_encode_pages if k.is_cuda
              else lowrank_encode.lowrank_encode_pages_ref)
        k, v = _last_contiguous(k), _last_contiguous(v)
        if self.inner is None:
            fn(k, v, b["k_enc"], b["v_enc"], store["k"], store["v"], page_ids)
            return
        n = k.shape[0]
        tmp_k = torch.empty(n, self.kvh, self.page_size, self.width, device=k.device)
        tmp_v = torch.empty_like(tmp_k)
        fn(k, v, b["k_enc"], b["v_enc"], tmp_k, tmp_v, torch.arange(n, device=k.device))
        self.inner.encode(store, page_ids, tmp_k, tmp_v)

    def seal(self, store, page_ids, k, v):
        """Pages already in the dense (projected, zero padded) form [n, KVH, P, D] -> the store."""
        if self.inner is None:
            store["k"][page_ids] = k[..., :self.rk].half()
            store["v"][page_ids] = v[..., :self.rv].half()
            return
        self.inner.encode(store, page_ids, _width(k, self.width), _width(v, self.width))

    def dequantize(self, store, page_ids):
        """Stored pages in the dense form: projected K/V zero padded to [n, KVH, P, D] fp32 (what
        a projected query attends to; not a reconstruction of k, v)."""
        if self.inner is None:
            kr, vr = store["k"][page_ids].float(), store["v"][page_ids].float()
        else:
            kr, vr = self.inner.dequantize(store, page_ids)
            kr, vr = kr[..., :self.rk], vr[..., :self.rv]
        return _width(kr, self.head_dim), _width(vr, self.head_dim)

    def decode_attention(self, q, store, page_table, n_full, dense_k, dense_v, dense_lens,
                         scale, num_splits=1):
        """q: q_red zero padded [B, H, D]; dense_k/v in the dense form. Returns o_red [B, H, r_v]."""
        if self.inner is not None:  # the HACK kernel on the reduced codes, at the HACK width
            w = self.width
            out = self.inner.decode_attention(
                _width(q, w).contiguous(), store, page_table, n_full, _width(dense_k, w),
                _width(dense_v, w), dense_lens, scale, num_splits)  # [B, H, w]
            return out[..., :self.rv]
        fn = (lr_attn.lowrank_decode_attention if q.is_cuda
              else lr_attn.lowrank_decode_attention_ref)
        return fn(q[..., :self.rk], store["k"], store["v"], page_table, n_full, dense_k, dense_v,
                  dense_lens, scale, num_splits=num_splits)

    def num_splits(self, batch, max_len, num_sms):
        if self.inner is not None:
            return self.inner.num_splits(batch, max_len, num_sms)
        return super().num_splits(batch, max_len, num_sms)

    def page_bytes_per_token(self):
        if self.inner is None:
            return lr_attn.lowrank_bytes_per_token(self.rk, self.rv)
        return self.inner.page_bytes_per_token()


def _width(x: torch.Tensor, w: int) -> torch.Tensor:
    """The first w columns of x [.., C]: a slice when C >= w, zero padded when C < w."""
    c = x.shape[-1]
    return x[..., :w] if c >= w else torch.nn.functional.pad(x, (0, w - c))


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class LowRankCodec(KVCodec):
    """Dispatches to one LowRankLayerCodec per layer (ranks differ between layers)."""

    def __init__(self, name, num_kv_heads, page_size, head_dim, bases: LowRankBases,
                 bits: int | None = None):
        super().__init__(num_kv_heads, page_size, head_dim)
        self.name, self.bases = name, bases
        for i, b in enumerate(bases.layers):
            for n, t in b.items():
                if t.dim() != 3 or t.shape[:2] != (num_kv_heads, head_dim) or not 1 <= t.shape[2] <= head_dim:
                    raise ValueError(f"codec: lowrank basis layers.{i}.{n} has shape {tuple(t.shape)}, "
                                     f"expected [KVH={num_kv_heads}, D={head_dim}, r<=D]")
        self.layers = [LowRankLayerCodec(name, num_kv_heads, page_size, head_dim, b, bits)
                       for b in bases.layers]
        self.n_sink = self.layers[0].n_sink

    def for_layer(self, layer: int) -> KVCodec:
        return self.layers[layer]

    def _per_layer(self, *_):
        raise TypeError("LowRankCodec has one codec per layer: use for_layer(layer)")

    new_store = encode = seal = dequantize = project_query = to_dense = _per_layer

    def page_bytes_per_token(self):
        return sum(c.page_bytes_per_token() for c in self.layers) / len(self.layers)
