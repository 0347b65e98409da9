"""A plain batched Llama for training, with Hugging Face parameter names so that its
state_dict is a checkpoint the engine (and transformers) load as LlamaForCausalLM.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zipserve.engine.config import ModelConfig
from zipserve.engine.model import RMSNorm, llama3_inv_freq


class _Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.q_size, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.kv_size, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.kv_size, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.q_size, c.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        c = self.c
        q = self.q_proj(x).view(b, t, c.num_heads, c.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        o = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=c.num_heads != c.num_kv_heads
        )
        return self.o_proj(o.transpose(1, 2).reshape(b, t, c.q_size))


def _rope(x, cos, sin):
    # x: [B, h, T, D]; cos/sin: [T, D/2] fp32
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class _MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = _Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = _MLP(c)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Backbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class TrainLlama(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.model = _Backbone(c)
        add_head_and_rope(self, c)

    def init_weights(self, generator: torch.Generator) -> None:
        init_llama_weights(self, self.config.num_layers, generator)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V]."""
        t = ids.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under their Hugging Face names (lm_head left out when tied)."""
        sd = {k: v for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd


def init_llama_weights(model: nn.Module, num_layers: int, generator: torch.Generator) -> None:
    """GPT-2-style init shared by the training models: N(0, 0.02), residual projections scaled
    by 1/sqrt(2 L), norms 1, biases 0."""
    std = 0.02
    resid_std = std / math.sqrt(2 * num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                s = resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.copy_(torch.randn(p.shape, generator=generator) * s)


def add_head_and_rope(model: nn.Module, c: ModelConfig) -> None:
    """model.lm_head (tied to model.model.embed_tokens when the config says so) and the RoPE
    tables as non-persistent buffers cos/sin [max_positions, D/2]."""
    model.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
    if c.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    freqs = torch.outer(torch.arange(c.max_position_embeddings).float(), llama3_inv_freq(c))
    model.register_buffer("cos", freqs.cos(), persistent=False)  # [maxT, D/2]
    model.register_buffer("sin", freqs.sin(), persistent=False)
