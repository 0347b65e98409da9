"""Test helper: tiny random Hugging Face checkpoints (Llama, Mistral, Qwen2) with a real tokenizer.

`make_hf_checkpoint(dir, arch, ...)` writes config.json, safetensors weights (optionally sharded,
in fp32/fp16/bf16), tokenizer.json (a byte-level BPE trained on Python-like text, BOS added by
its post-processor) and tokenizer_config.json with a small chat template. `load_hf_model(dir)`
gives the transformers reference model in fp32 eval mode for logits comparisons.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

PAD, BOS, EOS = "<pad>", "<s>", "</s>"  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

_CORPUS = '''
def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()

import os, sys, json
for path in sorted(os.listdir(".")):
    if path.endswith(".py") and not path.startswith("_"):
        print(json.dumps({"path": path, "size": os.path.getsize(path)}))
result = [x * x for x in range(10) if x % 2 == 0]
while True:
    value = input("number? ")
    try:
        number = float(value)
    except ValueError:
        continue
    break
return {"user": "hello", "assistant": "Hi! How can I help you today?"}
'''


@lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int) -> str:
    """Train (once per vocab size) a byte-level BPE and return its tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    assert [tok.token_to_id(t) for t in (PAD, BOS, EOS)] == [0, 1, 2]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    return tok.to_str()


def write_tokenizer(
    out_dir: Path,
    vocab_size: int,
    chat_template: str | None = CHAT_TEMPLATE,
) -> None:
    """Write tokenizer.json and tokenizer_config.json (bos <s>=1, eos </s>=2, pad <pad>=0)."""
    (out_dir / "tokenizer.json").write_text(_tokenizer_json(vocab_size), encoding="utf-8")
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def _hf_config(arch: str, tie_word_embeddings: bool, overrides: dict):
    import transformers

    base = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=tie_word_embeddings,
    )
    if arch == "LlamaForCausalLM":
        cls = transformers.LlamaConfig
    elif arch == "MistralForCausalLM":
        cls, base["sliding_window"] = transformers.MistralConfig, None
    elif arch == "Qwen2ForCausalLM":
        cls = transformers.Qwen2Config
        base.pop("head_dim")  # Qwen2 derives it from hidden_size / num_attention_heads
    else:
        raise ValueError(f"arch: {arch!r} has no fixture")
    base.update(overrides)
    if "rope_scaling" in base:  # transformers 5 keeps theta and scaling in rope_parameters
        base["rope_parameters"] = {"rope_theta": base.pop("rope_theta"), **base.pop("rope_scaling")}
    config = cls(**base)
    config.architectures = [arch]
    return config


@torch.no_grad()
def _init_weights(model: torch.nn.Module, seed: int, std: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith(".bias"):  # Qwen2 q/k/v biases: clearly non-zero
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(std * torch.randn(p.shape, generator=gen))


def make_hf_checkpoint(
    out_dir: Path,
    arch: str = "LlamaForCausalLM",
    *,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    sharded: bool = False,
    seed: int = 0,
    init_std: float = 0.02,
    chat_template: str | None = CHAT_TEMPLATE,
    **config_overrides,
) -> Path:
    """Build, save and return a tiny random `arch` model directory (weights + tokenizer).

    `config_overrides` are transformers config fields (e.g. num_hidden_layers=3,
    rope_scaling=LLAMA3_ROPE, rope_theta=500000.0).
    """
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _hf_config(arch, tie_word_embeddings, config_overrides)
    model = getattr(transformers, arch)(config)
    _init_weights(model, seed, init_std)
    if tie_word_embeddings:
        model.tie_weights()
    model = model.to(dtype).eval()
    model.save_pretrained(
        out_dir, safe_serialization=True, max_shard_size="60KB" if sharded else "2GB"
    )
    write_tokenizer(out_dir, config.vocab_size, chat_template)
    return out_dir


def load_hf_model(path: Path):
    """The transformers reference model of a checkpoint directory, fp32, eval mode."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
