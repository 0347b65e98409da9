"""ZeroC-style low-rank KV: each layer's K and V are stored projected onto calibrated per-KV-head
bases (post-RoPE for K), optionally quantized further with HACK (`lowrank+hack2/4`).

Pages of layer l hold k @ Bk [.., r_k(l)] and v @ Bv [.., r_v(l)] (float16, or HACK codes of them).
Decode attention for `lowrank` runs in the reduced dimension: q is projected onto Bk, scores are
taken against the stored r_k-dim keys, p is applied to the r_v-dim values, and only the (H, r_v)
result is lifted back through Bv^T (a D x r product per head; folding Bv^T into W_o would remove
it, not done yet). The 16-bit open page and sinks are attended at full dimension.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from zipserve.compress.codecs import HackCodec, KVCodec
from zipserve.compress.reference_attention import dequant_decode_attention


class LowRankBases:
    """Per layer and KV head, [KVH, D, r] matrices: k_enc stores keys (k @ k_enc), k_dec projects
    queries (q @ k_dec) so that q_red . k_red ~= q . k; v_enc stores values, v_dec lifts the
    reduced attention output back (o_red @ v_dec^T)."""

    def __init__(self, layers: list[dict[str, torch.Tensor]], info: dict):
        self.layers, self.info = layers, info

    @classmethod
    def load(cls, model_dir: str | Path) -> "LowRankBases":
        """The calibrated bases beside a checkpoint; for a `random:NAME` model (random weights,
        nothing to calibrate on) random ones, see `random_for`."""
        if str(model_dir).startswith("random:"):
            return cls.random_for(str(model_dir))
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
    def random_for(cls, model: str, budget: float = 0.5, seed: int = 0) -> "LowRankBases":
        """Random orthonormal bases of uniform rank round(budget * head_dim) for K and V of every
        layer of the `random:NAME` model: the bytes and the work of a calibrated codec at that
        budget, for speed benchmarks on random weights; quality means nothing here."""
        from zipserve.engine.config import random_model_config

        cfg = random_model_config(model)
        d, h = cfg.head_dim, cfg.num_kv_heads
        r = max(1, round(budget * d))
        gen = torch.Generator().manual_seed(seed)
        layers = []
        for _ in range(cfg.num_layers):
            k = torch.linalg.qr(torch.randn(h, d, d, generator=gen)).Q[..., :r]  # [KVH, D, r]
            v = torch.linalg.qr(torch.randn(h, d, d, generator=gen)).Q[..., :r]  # [KVH, D, r]
            layers.append({"k_enc": k, "k_dec": k, "v_enc": v, "v_dec": v})
        info = {"budget": budget, "basis": f"random orthonormal, rank {r} of {d} (random "
                                           f"weights: speed benchmarks only)",
                "k_ranks": [r] * cfg.num_layers, "v_ranks": [r] * cfg.num_layers,
                "head_dim": d}
        return cls(layers, info)


def _pad_pow2(r: int, lo: int = 64) -> int:
    p = lo
    while p < r:
        p *= 2
    return p


class LowRankLayerCodec(KVCodec):
    """One layer's low-rank codec (pages: projected K/V, float16 or HACK codes)."""

    def __init__(self, name, num_kv_heads, page_size, head_dim, bases: dict[str, torch.Tensor],
                 bits: int | None):
        super().__init__(num_kv_heads, page_size, head_dim)
        self.name, self.bits = name, bits
        self.rk, self.rv = bases["k_enc"].shape[-1], bases["v_enc"].shape[-1]
        self._bases_cpu = {n: b.float() for n, b in bases.items()}  # each [KVH, D, r]
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

    def _project(self, x: torch.Tensor, basis: torch.Tensor, width: int) -> torch.Tensor:
        y = torch.einsum("nhpd,hdr->nhpr", x.float(), basis)  # [n, KVH, P, r]
        if width > y.shape[-1]:
            y = torch.nn.functional.pad(y, (0, width - y.shape[-1]))
        return y

    def new_store(self, num_pages, device):
        shape = (num_pages, self.kvh, self.page_size)
        if self.inner is None:
            return {"k": torch.zeros(*shape, self.rk, dtype=torch.float16, device=device),
                    "v": torch.zeros(*shape, self.rv, dtype=torch.float16, device=device)}
        return self.inner.new_store(num_pages, device)

    def encode(self, store, page_ids, k, v):
        b = self._bases(k.device)
        if self.inner is None:
            store["k"][page_ids] = self._project(k, b["k_enc"], self.rk).half()
            store["v"][page_ids] = self._project(v, b["v_enc"], self.rv).half()
            return
        self.inner.encode(store, page_ids, self._project(k, b["k_enc"], self.width),
                          self._project(v, b["v_enc"], self.width))

    def _reduced(self, store, page_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored reduced K [n, KVH, P, r_k] and V [n, KVH, P, r_v] (fp32)."""
        if self.inner is None:
            return store["k"][page_ids].float(), store["v"][page_ids].float()
        kr, vr = self.inner.dequantize(store, page_ids)
        return kr[..., :self.rk], vr[..., :self.rv]

    def dequantize(self, store, page_ids):
        """Full-dimension stand-ins: q . k_approx == q_red . k_red and v_approx lifts through
        v_dec (what attention sees; not a reconstruction of k itself)."""
        b = self._bases(store[next(iter(store))].device)
        kr, vr = self._reduced(store, page_ids)
        return (torch.einsum("nhpr,hdr->nhpd", kr, b["k_dec"]),
                torch.einsum("nhpr,hdr->nhpd", vr, b["v_dec"]))

    def decode_attention(self, q, store, page_table, n_full, dense_k, dense_v, dense_lens,
                         scale, num_splits=1):
        if self.inner is not None:  # no reduced-dim kernel for the quantized variant yet
            return dequant_decode_attention(self, q, store, page_table, n_full, dense_k,
                                            dense_v, dense_lens, scale)
        bases = self._bases(q.device)
        b_sz, h, d = q.shape
        g = h // self.kvh
        out = torch.zeros(b_sz, h, d, dtype=torch.float32, device=q.device)
        for b, (npg, dl) in enumerate(zip(n_full.tolist(), dense_lens.tolist())):
            qb = q[b].float().view(self.kvh, g, d)
            ids = page_table[b, :npg].long()
            kr = store["k"][ids].float().transpose(0, 1).flatten(1, 2)  # [KVH, N, r_k]
            vr = store["v"][ids].float().transpose(0, 1).flatten(1, 2)  # [KVH, N, r_v]
            q_red = torch.einsum("kgd,kdr->kgr", qb, bases["k_dec"])  # [KVH, G, r_k]
            s_pages = torch.einsum("kgr,knr->kgn", q_red, kr) * scale
            s_dense = torch.einsum("kgd,ktd->kgt", qb, dense_k[b, :, :dl].float()) * scale
            w = torch.softmax(torch.cat([s_pages, s_dense], -1), -1)
            o_red = torch.einsum("kgn,knr->kgr", w[..., :kr.shape[1]], vr)  # [KVH, G, r_v]
            o = torch.einsum("kgr,kdr->kgd", o_red, bases["v_dec"]) + torch.einsum(
                "kgt,ktd->kgd", w[..., kr.shape[1]:], dense_v[b, :, :dl].float())
            out[b] = o.reshape(h, d)
        return out.to(q.dtype)

    def page_bytes_per_token(self):
        if self.inner is None:
            return 2 * (self.rk + self.rv)
        return self.inner.page_bytes_per_token()


class LowRankCodec(KVCodec):
    """Dispatches to one LowRankLayerCodec per layer (ranks differ between layers)."""
    graph_safe = False  # its decode attention loops over sequences in torch

    def __init__(self, name, num_kv_heads, page_size, head_dim, bases: LowRankBases,
                 bits: int | None = None):
        super().__init__(num_kv_heads, page_size, head_dim)
        self.name, self.bases = name, bases
        self.layers = [LowRankLayerCodec(name, num_kv_heads, page_size, head_dim, b, bits)
                       for b in bases.layers]
        self.n_sink = self.layers[0].n_sink

    def for_layer(self, layer: int) -> KVCodec:
        return self.layers[layer]

    def _per_layer(self, *_):
        raise TypeError("LowRankCodec has one codec per layer: use for_layer(layer)")

    new_store = encode = dequantize = _per_layer

    def page_bytes_per_token(self):
        return sum(c.page_bytes_per_token() for c in self.layers) / len(self.layers)
