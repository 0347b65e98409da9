"""The layer-condensed KV (LCKV, arXiv 2405.10637) variant of the Llama forward.

Layers (see `LCKVSpec`): bottom warmup layers and top warmup layers are ordinary `DecoderLayer`s
with their own KV; the "top" of the condensed stack, layer t = L - 1 - warmup_top, is also an
ordinary layer whose KV is cached; the layers between compute queries only (`CondensedLayer`)
and attend to layer t's KV of earlier tokens (never their own: that KV is computed above them).
Only `config.kv_layers` have KV pages; the cache is indexed by KV layer, not model layer.

Decode is one ordinary step: the condensed layers read layer t's cached KV of positions < pos
before layer t writes the new token's KV. Prompt encoding resolves the cyclic dependency:
prompts of at least m + b tokens run m + b - 1 "dry" passes over the condensed stack (KV of
layer t starting at zero, each pass fed the previous pass's KV) and a last pass that stores KV in
the cache; shorter prompts compute layer t's KV token by token (exact) before that last pass.
A prefill chunk that starts later (page-by-page scoring over a compressed cache, one sequence)
also attends to the past the cache holds for layer t, as decode would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zipserve.engine.config import ModelConfig
from zipserve.engine.model import MLP, DecoderLayer, ForwardBatch, RMSNorm, RotaryEmbedding


def strict_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int], scale: float
) -> torch.Tensor:
    """Each packed token attends to the earlier tokens of its sequence only (diagonal masked).
    q [T, H, D], k/v [T, KVH, D] -> [T, H, D]; a sequence's first token gets zeros."""
    gqa = q.shape[1] != k.shape[1]
    out = torch.zeros_like(q)
    start = 0
    for n in seq_lens:
        if n > 1:
            qs = q[start + 1 : start + n].transpose(0, 1).unsqueeze(0)  # [1, H, n-1, D]
            ks = k[start : start + n - 1].transpose(0, 1).unsqueeze(0)  # [1, KVH, n-1, D]
            vs = v[start : start + n - 1].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa
            )
            out[start + 1 : start + n] = o[0].transpose(0, 1)
        start += n
    return out


def attend_with_past(
    q: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One chunk's tokens q [n, H, D] attend to all of past_k/v [N, KVH, D] (N >= 1) and to the
    chunk's earlier tokens of k/v [n, KVH, D] (diagonal masked) -> [n, H, D]."""
    n, big_n = q.shape[0], past_k.shape[0]
    keys = torch.cat([past_k.to(k.dtype), k]).transpose(0, 1).unsqueeze(0)  # [1, KVH, N+n, D]
    vals = torch.cat([past_v.to(v.dtype), v]).transpose(0, 1).unsqueeze(0)
    ones = torch.ones(n, n, dtype=torch.bool, device=q.device)
    mask = torch.cat(
        [torch.ones(n, big_n, dtype=torch.bool, device=q.device), ones.tril(-1)], 1
    )  # [n, N+n]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        keys,
        vals,
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return o[0].transpose(0, 1)


def attend_all(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [m, H, D] attends to every row of k/v [n, KVH, D] -> [m, H, D] (zeros when n == 0)."""
    if k.shape[0] == 0:
        return torch.zeros_like(q)
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return o[0].transpose(0, 1)


class CondensedAttention(nn.Module):
    """Queries only; keys and values are those of KV layer `source` (the condensed top)."""

    def __init__(self, config: ModelConfig, source: int):
        super().__init__()
        self.source = source
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.q_size = config.q_size
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.q_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def _queries(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding):
        q = self.q_proj(x).view(x.shape[0], self.num_heads, self.head_dim)  # [T, H, D]
        return rope.rotate(positions, q)

    def forward(self, x, batch: ForwardBatch, rope: RotaryEmbedding, cache) -> torch.Tensor:
        """Decode: attend to the cached KV of every position before the token's own."""
        q = self._queries(x, batch.positions, rope)
        o = cache.attend_past(self.source, q, batch, self.scale)  # [B, H, D]
        return self.o_proj(o.reshape(x.shape[0], self.q_size))

    def forward_fresh(
        self, x, positions, seq_lens: list[int], k, v, rope, past=None
    ) -> torch.Tensor:
        """Prefill: attend to the given KV [T, KVH, D] of earlier tokens of the same sequence
        (and, for one sequence's later chunk, to all of past = (k, v) [N, KVH, D])."""
        q = self._queries(x, positions, rope)
        if past is None:
            o = strict_causal_attention(q, k, v, seq_lens, self.scale)
        else:
            o = attend_with_past(q, past[0], past[1], k, v, self.scale)
        return self.o_proj(o.reshape(x.shape[0], self.q_size))

    def forward_one(self, x, positions, k_past, v_past, rope) -> torch.Tensor:
        """One token x [1, hidden] attending to k/v_past [n, KVH, D] (the tokens before it)."""
        q = self._queries(x, positions, rope)
        return self.o_proj(attend_all(q, k_past, v_past, self.scale).reshape(1, self.q_size))


class CondensedLayer(nn.Module):
    def __init__(self, config: ModelConfig, source: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = CondensedAttention(config, source)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def _mlp(self, x):
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x, batch, rope, cache):
        return self._mlp(x + self.self_attn(self.input_layernorm(x), batch, rope, cache))

    def forward_fresh(self, x, positions, seq_lens, k, v, rope, past=None):
        return self._mlp(
            x
            + self.self_attn.forward_fresh(
                self.input_layernorm(x), positions, seq_lens, k, v, rope, past
            )
        )

    def forward_one(self, x, positions, k_past, v_past, rope):
        return self._mlp(
            x + self.self_attn.forward_one(self.input_layernorm(x), positions, k_past, v_past, rope)
        )


def _qkv(layer: DecoderLayer, x: torch.Tensor, positions, rope):
    """q [T, H, D], k/v [T, KVH, D] of a standard layer's attention, RoPE applied."""
    a = layer.self_attn
    qkv = a.qkv_proj(layer.input_layernorm(x))
    q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
    t = x.shape[0]
    q, k = rope(
        positions, q.view(t, a.num_heads, a.head_dim), k.view(t, a.num_kv_heads, a.head_dim)
    )
    return q, k, v.view(t, a.num_kv_heads, a.head_dim)


def _finish_layer(layer: DecoderLayer, x, o):
    """Residual + o_proj of attention output o [T, H, D], then the MLP block."""
    x = x + layer.self_attn.o_proj(o.reshape(x.shape[0], -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


class LCKVModel(nn.Module):
    """Embedding, LCKV decoder layers, final norm and LM head over packed tokens."""

    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        if config.lckv is None:
            raise ValueError("LCKVModel needs a config with an lckv spec")
        self.config, self.spec = config, config.lckv
        kv_index = {layer: i for i, layer in enumerate(config.kv_layers)}
        self.top = config.num_layers - 1 - self.spec.warmup_top  # the condensed stack's top
        self.top_kv = self.spec.warmup_bottom  # its KV-layer index
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, kv_index[i])
            if i in kv_index
            else CondensedLayer(config, kv_index[config.kv_source(i)])
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(config, max_positions)

    @property
    def condensed(self) -> list[CondensedLayer]:
        return list(self.layers[self.spec.warmup_bottom : self.top])

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache) -> torch.Tensor:
        """Logits [N, vocab] (fp32) at batch.logits_indices (all tokens when None)."""
        x = self.embed_tokens(batch.input_ids)  # [T, hidden]
        if not batch.is_prefill:
            for layer in self.layers:
                x = layer(x, batch, self.rope, cache)
        else:
            x = self._prefill(x, batch, cache)
        if batch.logits_indices is not None:
            x = x[batch.logits_indices]
        return self.lm_head(self.norm(x)).float()

    # -- prompt encoding ---------------------------------------------------------------------
    def _prefill(self, x: torch.Tensor, batch: ForwardBatch, cache) -> torch.Tensor:
        wb, lens, pos = self.spec.warmup_bottom, batch.seq_lens_host, batch.positions
        past = self._past(batch, cache)
        for layer in self.layers[:wb]:
            x = layer(x, batch, self.rope, cache)
        k, v = self.converged_top_kv(x, pos, lens, past)
        for layer in self.condensed:  # the last pass: its layer-t KV goes into the cache
            x = layer.forward_fresh(x, pos, lens, k, v, self.rope, past)
        for layer in self.layers[self.top :]:
            x = layer(x, batch, self.rope, cache)
        return x

    def _past(self, batch: ForwardBatch, cache):
        """Layer t's cached K/V [N, KVH, D] before a chunk that does not start at token 0."""
        metas = batch.prefill_seqs or ()
        if all(meta[2] == 0 for meta in metas):
            return None
        if len(metas) != 1 or not cache.scores_by_page:
            raise ValueError(
                "LCKV: a prefill chunk that does not start at token 0 needs a "
                "compressed cache and one sequence in the batch"
            )
        slot, pages, start, _ = metas[0]
        k, v = cache.past_kv(self.top_kv, slot, pages[: start // cache.page_size])
        dtype = self.embed_tokens.weight.dtype
        return k.to(dtype), v.to(dtype)

    def converged_top_kv(
        self, h: torch.Tensor, positions: torch.Tensor, seq_lens: list[int], past=None
    ):
        """Layer t's K/V [T, KVH, D] that the last pass's condensed layers attend to, given the
        bottom warmup layers' output h [T, hidden]: after m + b - 1 dry passes for prompts of at
        least m + b tokens, exact (token by token) for shorter ones. past: see _past."""
        c = self.config
        k = h.new_zeros(h.shape[0], c.num_kv_heads, c.head_dim)
        v = torch.zeros_like(k)
        n_pass = self.spec.passes
        starts = [0]
        for n in seq_lens:
            starts.append(starts[-1] + n)
        long = [i for i, n in enumerate(seq_lens) if n >= n_pass]
        if long:
            rows = torch.cat(
                [torch.arange(starts[i], starts[i + 1], device=h.device) for i in long]
            )
            hl, pl, ll = h[rows], positions[rows], [seq_lens[i] for i in long]
            kl, vl = k[rows], v[rows]
            for _ in range(n_pass - 1):
                kl, vl = self.dry_pass(hl, pl, ll, kl, vl, past)
            k[rows], v[rows] = kl, vl
        for i, n in enumerate(seq_lens):
            if n < n_pass:
                s = slice(starts[i], starts[i + 1])
                k[s], v[s] = self.sequential_top_kv(h[s], positions[s], past)
        return k, v

    def dry_pass(self, h, positions, seq_lens, k, v, past=None):
        """One pass over the condensed stack fed layer t's K/V k, v; returns the new K/V."""
        x = h
        for layer in self.condensed:
            x = layer.forward_fresh(x, positions, seq_lens, k, v, self.rope, past)
        _, k_new, v_new = _qkv(self.layers[self.top], x, positions, self.rope)
        return k_new, v_new

    def sequential_top_kv(self, h: torch.Tensor, positions: torch.Tensor, past=None):
        """Layer t's exact K/V of one sequence [n, KVH, D], computed token by token (after
        past = (k, v) [N, KVH, D] when given)."""
        c = self.config
        n = h.shape[0]
        k = h.new_zeros(n, c.num_kv_heads, c.head_dim)
        v = torch.zeros_like(k)
        pk, pv = past if past is not None else (k[:0], v[:0])
        for i in range(n):
            x, p = h[i : i + 1], positions[i : i + 1]
            k_past, v_past = torch.cat([pk, k[:i]]), torch.cat([pv, v[:i]])
            for layer in self.condensed:
                x = layer.forward_one(x, p, k_past, v_past, self.rope)
            _, ki, vi = _qkv(self.layers[self.top], x, p, self.rope)
            k[i], v[i] = ki[0], vi[0]
        return k, v

    def sequential_forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Reference: every token of one sequence through every layer, one token at a time,
        each layer attending to the KV of its source layer (without a cache). Logits [T, V]."""
        c = self.config
        n = ids.shape[0]
        positions = torch.arange(n, device=ids.device)
        kv = {
            layer: (
                self.embed_tokens.weight.new_zeros(n, c.num_kv_heads, c.head_dim),
                self.embed_tokens.weight.new_zeros(n, c.num_kv_heads, c.head_dim),
            )
            for layer in c.kv_layers
        }
        outs = []
        for i in range(n):
            x, p = self.embed_tokens(ids[i : i + 1]), positions[i : i + 1]
            for idx, layer in enumerate(self.layers):
                if isinstance(layer, CondensedLayer):
                    k, v = kv[c.kv_source(idx)]
                    x = layer.forward_one(x, p, k[:i], v[:i], self.rope)
                else:
                    q, ki, vi = _qkv(layer, x, p, self.rope)
                    k, v = kv[idx]
                    k[i], v[i] = ki[0], vi[0]
                    x = _finish_layer(
                        layer, x, attend_all(q, k[: i + 1], v[: i + 1], layer.self_attn.scale)
                    )
            outs.append(x)
        return self.lm_head(self.norm(torch.cat(outs))).float()

    def load_hf_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face-named tensors in; KV layers get q/k/v fused, condensed ones keep q."""
        c = self.config
        own: dict[str, torch.Tensor] = {
            "embed_tokens.weight": tensors["model.embed_tokens.weight"],
            "norm.weight": tensors["model.norm.weight"],
        }
        if not c.tie_word_embeddings:
            own["lm_head.weight"] = tensors["lm_head.weight"]
        kv_layers = set(c.kv_layers)
        for i in range(c.num_layers):
            hf, me = f"model.layers.{i}.", f"layers.{i}."
            for name in (
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
                "self_attn.o_proj.weight",
                "mlp.down_proj.weight",
            ):
                own[me + name] = tensors[hf + name]
            own[me + "mlp.gate_up_proj.weight"] = torch.cat(
                [tensors[hf + "mlp.gate_proj.weight"], tensors[hf + "mlp.up_proj.weight"]]
            )
            if i in kv_layers:
                parts = "qkv"
                own[me + "self_attn.qkv_proj.weight"] = torch.cat(
                    [tensors[hf + f"self_attn.{p}_proj.weight"] for p in parts]
                )
                if c.attention_bias:
                    own[me + "self_attn.qkv_proj.bias"] = torch.cat(
                        [tensors[hf + f"self_attn.{p}_proj.bias"] for p in parts]
                    )
            else:
                own[me + "self_attn.q_proj.weight"] = tensors[hf + "self_attn.q_proj.weight"]
                if c.attention_bias:
                    own[me + "self_attn.q_proj.bias"] = tensors[hf + "self_attn.q_proj.bias"]
        params = dict(self.named_parameters())
        missing = set(params) - set(own) - ({"lm_head.weight"} if c.tie_word_embeddings else set())
        if missing:
            raise ValueError(f"LCKV load: no tensor for {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, value in own.items():
                params[name].copy_(value)
