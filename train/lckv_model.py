"""The LCKV variant of the training model (batched), with Hugging Face parameter names, so that its
state_dict is a checkpoint the engine loads as ZipserveLCKVForCausalLM.

Layers as in engine/lckv_model.py: standard warmup layers at the bottom and top, the condensed
stack's top layer t with its own K/V, and query-only layers between that attend to layer t's K/V
of earlier tokens. Training is iterative and parallel (the paper's scheme, as the prompt
encoding): layer t's K/V start at zero; m passes over the condensed stack without gradient, each
fed the previous pass's K/V, then b passes with gradient (which flows through the K/V handed
between those b passes); the last pass's output goes on to the top warmup layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zipserve.engine.config import ModelConfig
from zipserve.engine.model import RMSNorm
from zipserve.train.model import _MLP, _Layer, _rope, add_head_and_rope, init_llama_weights


class _CondensedAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.q_size, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.q_size, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, k, v):
        """x [B, T, hidden]; k/v [B, KVH, T, D] of layer t (None: still zero)."""
        b, t, _ = x.shape
        c = self.c
        if k is None or t < 2:  # zero keys and values (or nothing earlier): zero output
            return self.o_proj(x.new_zeros(b, t, c.q_size))
        q = _rope(self.q_proj(x).view(b, t, c.num_heads, c.head_dim).transpose(1, 2), cos, sin)
        # Token i attends to tokens < i: queries 1..T-1 causally over keys 0..T-2.
        o = F.scaled_dot_product_attention(
            q[:, :, 1:],
            k[:, :, :-1],
            v[:, :, :-1],
            is_causal=True,
            enable_gqa=c.num_heads != c.num_kv_heads,
        )
        o = torch.cat([o.new_zeros(b, c.num_heads, 1, c.head_dim), o], 2)  # [B, H, T, D]
        return self.o_proj(o.transpose(1, 2).reshape(b, t, c.q_size))


class _CondensedLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = _CondensedAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = _MLP(c)

    def forward(self, x, cos, sin, k, v):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k, v)
        return x + self.mlp(self.post_attention_layernorm(x))


def _layer_with_kv(layer: _Layer, x, cos, sin):
    """A standard layer's forward that also returns its K/V [B, KVH, T, D] (RoPE applied)."""
    a, c = layer.self_attn, layer.self_attn.c
    b, t, _ = x.shape
    h = layer.input_layernorm(x)
    q = _rope(a.q_proj(h).view(b, t, c.num_heads, c.head_dim).transpose(1, 2), cos, sin)
    k = _rope(a.k_proj(h).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2), cos, sin)
    v = a.v_proj(h).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
    o = F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=c.num_heads != c.num_kv_heads
    )
    x = x + a.o_proj(o.transpose(1, 2).reshape(b, t, c.q_size))
    return x + layer.mlp(layer.post_attention_layernorm(x)), k, v


class _Backbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        kv = set(c.kv_layers)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(
            _Layer(c) if i in kv else _CondensedLayer(c) for i in range(c.num_layers)
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class TrainLCKV(nn.Module):
    def __init__(
        self, c: ModelConfig, passes_no_grad: int | None = None, passes_grad: int | None = None
    ):
        """m / b default to the config's (the prompt-encoding passes)."""
        super().__init__()
        if c.lckv is None:
            raise ValueError("TrainLCKV needs a config with an lckv spec")
        self.config = c
        self.m = c.lckv.passes_no_grad if passes_no_grad is None else passes_no_grad
        self.b = c.lckv.passes_grad if passes_grad is None else passes_grad
        if self.m < 0 or self.b < 1:
            raise ValueError("passes: need m >= 0 passes without and b >= 1 with gradient")
        self.bottom = c.lckv.warmup_bottom
        self.top = c.num_layers - 1 - c.lckv.warmup_top
        self.model = _Backbone(c)
        add_head_and_rope(self, c)

    def init_weights(self, generator: torch.Generator) -> None:
        init_llama_weights(self, self.config.num_layers, generator)

    def _pass(self, x, cos, sin, k, v):
        """One pass over the condensed stack fed layer t's K/V; (output, new K, new V)."""
        layers = self.model.layers
        for layer in layers[self.bottom : self.top]:
            x = layer(x, cos, sin, k, v)
        return _layer_with_kv(layers[self.top], x, cos, sin)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V]."""
        t = ids.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        layers = self.model.layers
        x = self.model.embed_tokens(ids)
        for layer in layers[: self.bottom]:
            x = layer(x, cos, sin)
        k = v = None
        with torch.no_grad():
            for _ in range(self.m):
                _, k, v = self._pass(x, cos, sin, k, v)
        for _ in range(self.b):
            h, k, v = self._pass(x, cos, sin, k, v)
        x = h
        for layer in layers[self.top + 1 :]:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under their Hugging Face names (lm_head left out when tied)."""
        sd = dict(self.state_dict())
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd
