"""Model and engine configuration: frozen dataclasses validated where they are built.

`ModelConfig` is the engine's view of a Hugging Face `config.json` (Llama, Mistral, Qwen2 families)
or of a named random model (`random:tiny`, `random:llama3-8b`). `EngineConfig` holds the knobs of
the runtime (page size, pool size, batch limits).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

LCKV_ARCHITECTURE = "ZipserveLCKVForCausalLM"
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    LCKV_ARCHITECTURE,
)


class ConfigError(ValueError):
    """A model or engine configuration that zipserve cannot run; the message names the field."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_type: llama3`). Other types are refused."""

    factor: float
    """Divisor applied to the low frequencies."""
    low_freq_factor: float
    """Wavelengths above original_max / low_freq_factor are fully scaled."""
    high_freq_factor: float
    """Wavelengths below original_max / high_freq_factor are left alone."""
    original_max_position_embeddings: int
    """Context length the model was pretrained with."""


@dataclass(frozen=True)
class LCKVSpec:
    """Layer-condensed KV (arXiv 2405.10637): which layers keep their own KV.

    With L layers, the bottom `warmup_bottom` and top `warmup_top` layers are standard. The layer
    just below the top warmup layers, t = L - 1 - warmup_top (the "top" of the condensed stack),
    computes and caches its own KV; the layers between the bottom warmup layers and t compute only
    queries and attend to layer t's KV of *earlier* tokens (the diagonal is masked: a token's
    layer-t KV depends on its own lower layers). KV is therefore kept for warmup + 1 layers.
    """

    warmup_bottom: int = 1
    warmup_top: int = 1
    passes_no_grad: int = 7
    """m: prompt-encoding (and training) passes over the condensed stack without gradient."""
    passes_grad: int = 2
    """b: passes after those, with gradient in training; prompts of fewer than m + b tokens are
    encoded token by token instead."""

    @property
    def warmup(self) -> int:
        return self.warmup_bottom + self.warmup_top

    @property
    def passes(self) -> int:
        """Passes of prompt encoding over the condensed stack: m + b."""
        return self.passes_no_grad + self.passes_grad

    def to_hf(self) -> dict[str, int]:
        return {
            "warmup_bottom": self.warmup_bottom,
            "warmup_top": self.warmup_top,
            "passes_no_grad": self.passes_no_grad,
            "passes_grad": self.passes_grad,
        }

    @classmethod
    def from_hf(cls, d: Any) -> LCKVSpec:
        if not isinstance(d, dict):
            raise ConfigError("lckv: must be an object in config.json")
        unknown = set(d) - {"warmup_bottom", "warmup_top", "passes_no_grad", "passes_grad"}
        if unknown:
            raise ConfigError(f"lckv.{sorted(unknown)[0]}: unknown field")
        for k, v in d.items():
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"lckv.{k}: must be an integer, got {v!r}")
        return cls(**d)

    @classmethod
    def split(cls, warmup: int = 2, passes_no_grad: int = 7, passes_grad: int = 2) -> LCKVSpec:
        """w warmup layers split between bottom (the larger half) and top."""
        if warmup < 0:
            raise ConfigError(f"lckv warmup: must be >= 0, got {warmup}")
        return cls(warmup - warmup // 2, warmup // 2, passes_no_grad, passes_grad)


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a decoder-only Llama-family transformer."""

    architecture: str
    """One of SUPPORTED_ARCHITECTURES."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (GQA when fewer than num_heads)."""
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    """Longest sequence (prompt + generated) the engine accepts."""
    tie_word_embeddings: bool
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2)."""
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    """Dtype the checkpoint declares (bfloat16, float16, float32)."""
    lckv: LCKVSpec | None = None
    """Set exactly when architecture is ZipserveLCKVForCausalLM."""

    def __post_init__(self) -> None:
        if (self.lckv is not None) != (self.architecture == LCKV_ARCHITECTURE):
            raise ConfigError(f"lckv: required for {LCKV_ARCHITECTURE} and only for it")
        if self.lckv is not None:
            c = self.lckv
            if c.warmup_bottom < 0 or c.warmup_top < 0:
                raise ConfigError("lckv.warmup_bottom/warmup_top: must be >= 0")
            if c.warmup + 1 > self.num_layers:
                raise ConfigError(
                    f"lckv: {c.warmup} warmup layers + the condensed top layer "
                    f"need more than num_hidden_layers={self.num_layers}"
                )
            if c.passes_no_grad < 0 or c.passes_grad < 1:
                raise ConfigError("lckv.passes_no_grad must be >= 0 and lckv.passes_grad >= 1")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architectures: {self.architecture!r} is not supported; "
                f"zipserve runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_key_value_heads: {self.num_kv_heads} does not divide "
                f"num_attention_heads {self.num_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim: must be even for RoPE, got {self.head_dim}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("rms_norm_eps and rope_theta must be positive")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def kv_layers(self) -> tuple[int, ...]:
        """Model layers that compute and cache their own K/V, bottom to top. The KV cache, the
        codecs and the transfer index layers by position in this tuple ("KV layer")."""
        if self.lckv is None:
            return tuple(range(self.num_layers))
        top = self.num_layers - 1 - self.lckv.warmup_top
        return tuple(range(self.lckv.warmup_bottom)) + tuple(range(top, self.num_layers))

    @property
    def num_kv_layers(self) -> int:
        """Layers that have KV pages (all of them, except in an LCKV model)."""
        return len(self.kv_layers)

    def kv_source(self, layer: int) -> int:
        """The model layer whose K/V `layer`'s queries attend to (itself unless condensed)."""
        if self.lckv is None or layer < self.lckv.warmup_bottom:
            return layer
        return max(layer, self.num_layers - 1 - self.lckv.warmup_top)

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = 2 * self.q_size * h + 3 * h * i + 2 * h
        kv = 2 * self.kv_size * h
        if self.attention_bias:
            per_layer, kv = per_layer + self.q_size, kv + 2 * self.kv_size
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * per_layer + self.num_kv_layers * kv + h + head

    def kv_bytes_per_token(self, element_bytes: int = 2) -> int:
        """Bytes of uncompressed K and V one token occupies across all KV layers."""
        return 2 * self.num_kv_layers * self.kv_size * element_bytes

    def expected_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face tensor names and shapes a checkpoint of this config must contain."""
        h, i = self.hidden_size, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, h),
            "model.norm.weight": (h,),
        }
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        kv_layers = set(self.kv_layers)
        for layer in range(self.num_layers):
            p = f"model.layers.{layer}."
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            shapes[p + "self_attn.q_proj.weight"] = (self.q_size, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, self.q_size)
            if self.attention_bias:
                shapes[p + "self_attn.q_proj.bias"] = (self.q_size,)
            if layer in kv_layers:  # LCKV condensed layers compute queries only
                shapes[p + "self_attn.k_proj.weight"] = (self.kv_size, h)
                shapes[p + "self_attn.v_proj.weight"] = (self.kv_size, h)
                if self.attention_bias:
                    shapes[p + "self_attn.k_proj.bias"] = (self.kv_size,)
                    shapes[p + "self_attn.v_proj.bias"] = (self.kv_size,)
            shapes[p + "mlp.gate_proj.weight"] = (i, h)
            shapes[p + "mlp.up_proj.weight"] = (i, h)
            shapes[p + "mlp.down_proj.weight"] = (h, i)
        return shapes

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a parsed Hugging Face config.json, naming the field on any problem."""
        archs = d.get("architectures") or []
        if not archs:
            raise ConfigError("architectures: missing from config.json")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architectures: {arch!r} is not supported; zipserve runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def need(key: str) -> Any:
            if key not in d or d[key] is None:
                raise ConfigError(f"{key}: missing from config.json")
            return d[key]

        num_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = d.get("head_dim") or hidden // num_heads
        max_pos = need("max_position_embeddings")
        if arch == "MistralForCausalLM" and d.get("sliding_window"):
            # zipserve attends to the whole context: cap the context at the window so that
            # full attention and sliding-window attention are the same computation.
            max_pos = min(max_pos, int(d["sliding_window"]))
        if arch == "Qwen2ForCausalLM" and d.get("use_sliding_window"):
            raise ConfigError("use_sliding_window: sliding-window attention is not supported")
        # transformers >= 5 writes rope_theta and the scaling under `rope_parameters`.
        rope_params = d.get("rope_parameters") or {}
        if d.get("mlp_bias"):
            raise ConfigError("mlp_bias: MLP biases are not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act: {d['hidden_act']!r} is not supported (only 'silu')")
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(d.get("rope_theta") or rope_params.get("rope_theta") or 10000.0),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", arch == "Qwen2ForCausalLM")),
            rope_scaling=_parse_rope_scaling(d.get("rope_scaling") or rope_params or None),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            lckv=LCKVSpec.from_hf(need("lckv")) if arch == LCKV_ARCHITECTURE else None,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise ConfigError(f"model: no config.json in {path}")
        try:
            d = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config.json: not valid JSON ({e})") from e
        return cls.from_hf_dict(d)


def _parse_rope_scaling(rs: dict[str, Any] | None) -> RopeScaling | None:
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ConfigError(f"rope_scaling.rope_type: {kind!r} is not supported (only 'llama3')")
    try:
        return RopeScaling(
            factor=float(rs["factor"]),
            low_freq_factor=float(rs["low_freq_factor"]),
            high_freq_factor=float(rs["high_freq_factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"rope_scaling.{e.args[0]}: missing for rope_type llama3") from e


# Llama-3-8B's shapes (random weights; engine/loading.py draws them).
_LLAMA3_8B = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
    bos_token_id=128000,
    eos_token_ids=(128001, 128009),
    torch_dtype="bfloat16",
)

# Named random models: shapes only, weights drawn at load time (engine/loading.py builds them).
RANDOM_MODELS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_ids=(2,),
        torch_dtype="float32",
    ),
    "llama3-8b": _LLAMA3_8B,
    # Llama-3-8B's shape as an LCKV model (w = 2: KV for layers 0, 30, 31), for speed benchmarks.
    "llama3-8b-lckv": replace(_LLAMA3_8B, architecture=LCKV_ARCHITECTURE, lckv=LCKVSpec.split(2)),
    # 5 layers, w = 2: layers 0, 3, 4 keep KV; 1 and 2 attend to layer 3's.
    "tiny-lckv": ModelConfig(
        architecture=LCKV_ARCHITECTURE,
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_layers=5,
        num_heads=2,
        num_kv_heads=1,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_ids=(2,),
        torch_dtype="float32",
        lckv=LCKVSpec.split(2),
    ),
}


def random_model_config(name: str) -> ModelConfig:
    """`random:tiny` -> its ModelConfig; a clear error listing the known names otherwise."""
    key = name.removeprefix("random:")
    if key not in RANDOM_MODELS:
        raise ConfigError(
            f"model: unknown random model {name!r}; known: "
            + ", ".join("random:" + k for k in RANDOM_MODELS)
        )
    return RANDOM_MODELS[key]


@dataclass(frozen=True)
class EngineConfig:
    """Runtime knobs of one engine instance."""

    page_size: int = 64
    """Tokens per KV page; also the quantization partition of the compressed codecs."""
    num_pages: int | None = None
    """Pages in the pool; None sizes it from gpu_memory_fraction (GPU) or max_kv_tokens (CPU)."""
    max_kv_tokens: int = 65536
    """Pool size in tokens when num_pages is None and the device is the CPU."""
    gpu_memory_fraction: float = 0.85
    """Fraction of total GPU memory weights + KV pool + activations may use."""
    max_num_seqs: int = 256
    """Most sequences in the running decode batch."""
    max_prefill_tokens: int = 16384
    """Most prompt tokens in one packed prefill forward."""
    max_prefill_chunk: int = 0
    """Longest piece of one prompt prefilled per step (a multiple of page_size); longer prompts
    are prefilled in chunks, each attending to the KV cached by the ones before. 0: whole prompts."""
    cuda_graphs: bool = True
    """Capture the decode step in CUDA graphs over batch-size buckets (GPU only)."""
    graph_batch_sizes: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 32, 48, 64, 96, 128))
    """Batch-size buckets captured when cuda_graphs is on (a batch runs in the next bucket up)."""
    decode_splits: int = 0
    """Sequence splits of the decode attention kernel; 0 chooses from the batch size."""
    codec: str = "bf16"
    """KV codec, a name in the registry (compress/codecs.py): bf16 (dense pages), fp8, kivi2, kivi4,
    hack2, hack4, hack2mix (per-layer bits from the model's kvbits.json), lowrank, lowrank+hack2/4,
    or one registered at run time."""
    lowrank_bases: str | None = None
    """Directory holding lowrank.safetensors for the lowrank codecs (default: the model's)."""
    lowrank_fold: bool = True
    """lowrank codecs: fold V's basis into W_o (False: lift the output back every step, the
    unfolded reference)."""
    decode_kv: str = "compressed"
    """What the engine keeps of a codec's KV: "compressed" (the codec's pages and kernel),
    "dense" (16-bit pages holding the codec's dequantized values, bf16 kernel; received layers
    are dequantized on import) or "auto" (engine/decode_kv.py: choose_decode_kv)."""
    prefix_caching: bool = True
    """Reuse the KV pages of prompts' common prefixes (engine/prefix_cache.py): full pages keyed by
    their tokens and all before them, shared and reference-counted, evicted least recently used
    when free pages run out; a request prefills only its uncached suffix. Exact for bf16; with a
    lossy codec the suffix attends to the prefix as the codec holds it (as a chunked prefill
    does). LCKV models run without it."""
    skip_tokenizer: bool = False
    """Run without a tokenizer (as vLLM's skip_tokenizer_init): prompts are token ids, outputs are
    token ids with empty text; text prompts, chat and stop strings are refused naming the field
    (engine/no_tokenizer.py). A model directory without tokenizer.json needs it."""

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"page_size: must be a power of two, got {self.page_size}")
        if self.num_pages is not None and self.num_pages < 1:
            raise ConfigError(f"num_pages: must be positive, got {self.num_pages}")
        if not 0.05 <= self.gpu_memory_fraction <= 0.98:
            raise ConfigError("gpu_memory_fraction: must be in [0.05, 0.98]")
        from zipserve.compress.codecs import codec_entry

        try:  # the registry's names (compress/codecs.py), a codec registered at run time too
            codec_entry(self.codec)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.lowrank_bases is not None and not isinstance(self.lowrank_bases, str):
            raise ConfigError("lowrank_bases: must be a directory path (str)")
        if not isinstance(self.lowrank_fold, bool):
            raise ConfigError("lowrank_fold: must be a bool")
        if not isinstance(self.prefix_caching, bool):
            raise ConfigError(f"prefix_caching: must be a bool, got {self.prefix_caching!r}")
        if not isinstance(self.skip_tokenizer, bool):
            raise ConfigError(f"skip_tokenizer: must be a bool, got {self.skip_tokenizer!r}")
        from zipserve.engine.decode_kv import check_decode_kv

        try:
            check_decode_kv(self.codec, self.decode_kv)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.max_num_seqs < 1 or self.max_prefill_tokens < 1:
            raise ConfigError("max_num_seqs and max_prefill_tokens must be positive")
        if (
            isinstance(self.max_prefill_chunk, bool)
            or not isinstance(self.max_prefill_chunk, int)
            or self.max_prefill_chunk < 0
            or self.max_prefill_chunk % self.page_size
        ):
            raise ConfigError(
                f"max_prefill_chunk: must be 0 or a positive multiple of page_size "
                f"({self.page_size}), got {self.max_prefill_chunk!r}"
            )
