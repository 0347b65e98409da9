"""The Llama-family decoder forward (Llama 2/3, Mistral, Qwen2): packed tokens in, logits out.

One forward serves both phases. A `ForwardBatch` carries the packed tokens of several sequences,
their positions and where each token's K/V goes in the paged cache. Prefill batches attend
causally within each prompt (SDPA/flash); decode batches hold one token per sequence and attend
to the paged cache through `zipserve.kernels.paged_decode_attention`.
Weights are fused at load time: q/k/v into one matrix, gate/up into one matrix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zipserve.engine.config import ModelConfig
from zipserve.engine.paged_cache import PagedKVCache
from zipserve.kernels.rms_norm import rms_norm, rms_norm_ref
from zipserve.kernels.rope import rope_qk, rope_qk_ref
from zipserve.kernels.silu_mul import silu_mul


@dataclass
class ForwardBatch:
    """Packed input of one forward step. T = total tokens, B = sequences."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    write_pages: torch.Tensor  # [T] int64: page that receives each token's K/V
    write_offsets: torch.Tensor  # [T] int64: slot within that page
    is_prefill: bool
    seq_lens_host: list[int] | None = None  # prefill: tokens of each packed sequence, in order
    page_table: torch.Tensor | None = None  # decode: [B, max_pages] int32
    seq_lens: torch.Tensor | None = None  # decode: [B] int32, tokens in cache incl. this one
    logits_indices: torch.Tensor | None = None  # [N] rows of the hidden state to project
    num_splits: int = 1  # decode attention sequence splits
    # Compressed caches only (see compress/compressed_cache.py):
    slots: torch.Tensor | None = None  # decode: [B] int64 open-page slot of each sequence
    seal_pages: torch.Tensor | None = None  # decode: [B] int64 page sealed after this token, or -1
    n_full: torch.Tensor | None = None  # decode: [B] int32 full (encoded) pages before this token
    prefill_seqs: list | None = None  # prefill: [(slot, pages, start, length)] per sequence
    on_layer_done: object | None = None  # prefill: callable(layer) once a layer's KV is stored


def llama3_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim/2], with llama3 frequency scaling when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


# RMSNorm, RoPE and the MLP's silu * up run as one Triton kernel each on a GPU (kernels/rms_norm.py,
# rope.py, silu_mul.py; H100, session 20: bf16's decode step at 8 x 8k 11.9 -> 9.6 ms, an 8k prefill
# 277 -> 219 ms). ZIPSERVE_NORM_ROPE_KERNELS=0 runs the torch forms instead (the runbook's A/B).
# Read once, at import.
NORM_ROPE_KERNELS = os.environ.get("ZIPSERVE_NORM_ROPE_KERNELS", "1") != "0"


def _fused(x: torch.Tensor) -> bool:
    """Whether x's RMSNorm / RoPE / silu * up take the Triton kernels: a CUDA tensor, the switch
    on, and inference (the kernels have no backward, and autocast's mixed dtypes are torch's to
    handle: training, train/recipe.py, keeps the torch forms)."""
    return (
        x.is_cuda
        and NORM_ROPE_KERNELS
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cuda")
    )


class RotaryEmbedding(nn.Module):
    """cos/sin tables over all positions, computed once in fp32."""

    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        inv_freq = llama3_inv_freq(config)  # [D/2]
        t = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q [T, H, D], k [T, KVH, D] rotated to their positions (rotate-half, non-interleaved, as
        in HF): one Triton launch on a GPU (kernels/rope.py), its torch reference elsewhere."""
        fn = rope_qk if _fused(q) else rope_qk_ref
        return fn(positions, q, k, self.cos, self.sin)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One tensor [T, h, D] rotated to its positions (queries without keys)."""
        fn = rope_qk if _fused(x) else rope_qk_ref
        return fn(positions, x, None, self.cos, self.sin)[0]


class RMSNorm(nn.Module):
    """weight * x / rms(x) over the last dim; one Triton launch on a GPU (kernels/rms_norm.py),
    its torch reference elsewhere."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = rms_norm if _fused(x) else rms_norm_ref
        return fn(x, self.weight, float(self.eps))[0]

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor):
        """(norm(x + residual), x + residual): the residual add fused into the norm's launch."""
        fn = rms_norm if _fused(x) else rms_norm_ref
        return fn(x, self.weight, float(self.eps), residual)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = self.head_dim**-0.5
        self.o_head_dim = self.head_dim  # per-head width o_proj takes (r_v for lowrank codecs)
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, rope: RotaryEmbedding, cache: PagedKVCache
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q + 2kv]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = rope(batch.positions, q, k)
        o = cache.attention(self.layer_idx, q, k, v, batch, self.scale)  # [T, H, >= o_head_dim]
        if batch.on_layer_done is not None:
            batch.on_layer_done(self.layer_idx)
        o = o[..., : self.o_head_dim]  # a reduced-space cache may return zero-padded columns
        return self.o_proj(o.reshape(t, self.num_heads * self.o_head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate, bias=False)
        self.down_proj = nn.Linear(self.intermediate, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2 I]
        if _fused(gate_up) and gate_up.dim() == 2:  # one launch (kernels/silu_mul.py)
            return self.down_proj(silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, batch, rope, cache):
        h = self.self_attn(self.input_layernorm(x), batch, rope, cache)
        h, x = self.post_attention_layernorm.add_and_norm(h, x)  # x + attention, normed
        return x + self.mlp(h)


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head over packed tokens."""

    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(config, max_positions)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        """Logits [N, vocab] (fp32) at batch.logits_indices (all tokens when None)."""
        x = self.embed_tokens(batch.input_ids)  # [T, hidden]
        for layer in self.layers:
            x = layer(x, batch, self.rope, cache)
        if batch.logits_indices is not None:
            x = x[batch.logits_indices]
        return self.lm_head(self.norm(x)).float()

    def load_hf_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up projections."""
        own: dict[str, torch.Tensor] = {
            "embed_tokens.weight": tensors["model.embed_tokens.weight"],
            "norm.weight": tensors["model.norm.weight"],
        }
        if not self.config.tie_word_embeddings:
            own["lm_head.weight"] = tensors["lm_head.weight"]
        for i in range(self.config.num_layers):
            hf, me = f"model.layers.{i}.", f"layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                own[me + norm + ".weight"] = tensors[hf + norm + ".weight"]
            own[me + "self_attn.qkv_proj.weight"] = torch.cat(
                [tensors[hf + f"self_attn.{p}_proj.weight"] for p in "qkv"]
            )
            if self.config.attention_bias:
                own[me + "self_attn.qkv_proj.bias"] = torch.cat(
                    [tensors[hf + f"self_attn.{p}_proj.bias"] for p in "qkv"]
                )
            own[me + "self_attn.o_proj.weight"] = tensors[hf + "self_attn.o_proj.weight"]
            own[me + "mlp.gate_up_proj.weight"] = torch.cat(
                [tensors[hf + "mlp.gate_proj.weight"], tensors[hf + "mlp.up_proj.weight"]]
            )
            own[me + "mlp.down_proj.weight"] = tensors[hf + "mlp.down_proj.weight"]
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in own.items():
                params[name].copy_(value)
