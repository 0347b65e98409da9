"""The reference-model recipe: corpus -> BPE tokenizer -> Llama trained from scratch -> a Hugging
Face model directory (config.json, model.safetensors, tokenizer files, training_log.json).

Seeded and resumable: state is saved every `save_every` steps to OUT/train_state.pt, and the batch
of step s depends only on (seed, s), so a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from zipserve.engine.config import LCKV_ARCHITECTURE, LCKVSpec, ModelConfig
from zipserve.train.corpus import Corpus, load_corpus
from zipserve.train.lckv_model import TrainLCKV
from zipserve.train.model import TrainLlama
from zipserve.train.tokenizer_train import train_tokenizer, write_tokenizer_files


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained model; written into training_log.json."""

    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    seq_len: int = 1024
    """Training window in tokens."""
    batch_size: int = 32
    """Windows per step."""
    total_tokens: int = 100_000_000
    """Training budget; steps = total_tokens // (batch_size * seq_len)."""
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 500
    eval_every: int = 500
    compile: bool = False
    """torch.compile the model (GPU)."""
    arch: str = "llama"
    """llama (standard) or lckv (layer-condensed KV, engine/lckv_model.py)."""
    lckv_warmup: int = 2
    """lckv: warmup layers with their own KV, split between bottom and top."""
    lckv_passes_no_grad: int = 7
    """lckv: m, passes over the condensed stack without gradient (training and prompts)."""
    lckv_passes_grad: int = 2
    """lckv: b, passes with gradient after those."""

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "lckv"):
            raise ValueError(f"arch: {self.arch!r} is not llama or lckv")
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "seq_len",
            "batch_size",
            "total_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError("seq_len: longer than max_position_embeddings")
        if self.hidden_size != self.num_heads * self.head_dim:
            raise ValueError("hidden_size: must equal num_heads * head_dim")

    @property
    def steps(self) -> int:
        return max(1, self.total_tokens // (self.batch_size * self.seq_len))

    def model_config(self) -> ModelConfig:
        lckv = (
            LCKVSpec.split(self.lckv_warmup, self.lckv_passes_no_grad, self.lckv_passes_grad)
            if self.arch == "lckv"
            else None
        )
        return ModelConfig(
            architecture=LCKV_ARCHITECTURE if lckv else "LlamaForCausalLM",
            lckv=lckv,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=1e-5,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_ids=(2,),
            torch_dtype="bfloat16",
        )


def hf_config_dict(c: ModelConfig) -> dict:
    return {
        "architectures": [c.architecture],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_ids)[0],
        "pad_token_id": 0,
        "torch_dtype": c.torch_dtype,
        **({"model_type": "zipserve-lckv", "lckv": c.lckv.to_hf()} if c.lckv else {}),
    }


def tokenize_docs(tok, docs) -> torch.Tensor:
    """One stream: BOS doc EOS BOS doc EOS ... as int32."""
    encs = tok.encode_batch([d.text for d in docs])
    parts = [torch.tensor(e.ids + [2], dtype=torch.int32) for e in encs]
    return torch.cat(parts)


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    )


def _batch(data: torch.Tensor, cfg: TrainConfig, step: int, device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - cfg.seq_len - 1, (cfg.batch_size,), generator=g)
    idx = starts[:, None] + torch.arange(cfg.seq_len + 1)  # [B, T+1]
    w = data[idx].long().to(device, non_blocking=True)
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def _eval_loss(model, data: torch.Tensor, cfg: TrainConfig, device, amp) -> float:
    model.eval()
    n = min(16, max(1, (len(data) - 1) // cfg.seq_len))
    losses = []
    for i in range(n):
        w = data[i * cfg.seq_len : (i + 1) * cfg.seq_len + 1].long().to(device)[None]
        with amp:
            logits = model(w[:, :-1])
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), w[0, 1:]).item())
    model.train()
    return sum(losses) / len(losses)


def make_train_model(mc: ModelConfig) -> nn.Module:
    return TrainLCKV(mc) if mc.lckv is not None else TrainLlama(mc)


def train(
    cfg: TrainConfig,
    out: str | Path,
    text_dir: str | Path | None = None,
    resume: bool = False,
    device: str | None = None,
    tokenizer_from: str | Path | None = None,
) -> dict:
    """tokenizer_from: a model directory whose tokenizer files are reused (not retrained)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    corpus: Corpus = load_corpus(text_dir)
    print(
        f"corpus {corpus.root}: {len(corpus.train)} training files, "
        f"{len(corpus.held_out)} held out (digest {corpus.digest()})"
    )
    t0 = time.time()
    if tokenizer_from is not None:
        from tokenizers import Tokenizer

        src = Path(tokenizer_from)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (src / name).exists() and src.resolve() != out.resolve():
                shutil.copyfile(src / name, out / name)
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        if tok.get_vocab_size() != cfg.vocab_size:
            raise ValueError(
                f"tokenizer_from: {src} has {tok.get_vocab_size()} tokens, "
                f"vocab_size is {cfg.vocab_size}"
            )
    elif resume and (out / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    else:
        tok = train_tokenizer((d.text for d in corpus.train), cfg.vocab_size)
        write_tokenizer_files(tok, out, cfg.max_position_embeddings)
    train_ids, held_ids = tokenize_docs(tok, corpus.train), tokenize_docs(tok, corpus.held_out)
    print(
        f"tokenizer ready in {time.time() - t0:.0f} s: {len(train_ids):,} training tokens, "
        f"{len(held_ids):,} held-out tokens; {cfg.steps} steps of "
        f"{cfg.batch_size * cfg.seq_len:,} tokens ({cfg.total_tokens / len(train_ids):.1f} "
        "epochs)"
    )

    mc = cfg.model_config()
    model = make_train_model(mc)
    model.init_weights(torch.Generator().manual_seed(cfg.seed))
    model.to(dev)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        fused=dev.type == "cuda",
    )
    state_path, log = out / "train_state.pt", {"loss": [], "eval": []}
    start, elapsed_before = 0, 0.0
    if resume and state_path.exists():
        st = torch.load(state_path, map_location=dev, weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start, elapsed_before = int(st["step"]), float(st["elapsed"])
        log = json.loads(st["log"])
        print(f"resumed at step {start}")
    fwd = torch.compile(model) if cfg.compile else model
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if dev.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    model.train()
    t_start = time.time()
    bar = tqdm(
        range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", mininterval=5.0
    )
    tokens_per_step = cfg.batch_size * cfg.seq_len
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        x, y = _batch(train_ids, cfg, step, dev)
        with amp:
            logits = fwd(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % 20 == 0 or step == cfg.steps - 1:
            lv = loss.item()
            log["loss"].append((step, lv))
            rate = (step + 1 - start) * tokens_per_step / (time.time() - t_start)
            bar.set_postfix(loss=f"{lv:.3f}", tok_s=f"{rate:,.0f}")
        if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
            log["eval"].append((step, _eval_loss(model, held_ids, cfg, dev, amp)))
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step + 1,
                    "elapsed": elapsed_before + time.time() - t_start,
                    "log": json.dumps(log),
                },
                state_path,
            )
    bar.close()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = elapsed_before + time.time() - t_start
    sd = {
        k: v.detach().to("cpu", torch.bfloat16).contiguous()
        for k, v in model.hf_state_dict().items()
    }
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(mc), indent=2) + "\n")
    summary = {
        "config": asdict(cfg),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "train_seconds": round(elapsed, 1),
        "steps": cfg.steps,
        "train_tokens_seen": cfg.steps * tokens_per_step,
        "corpus_root": str(corpus.root),
        "corpus_train_tokens": len(train_ids),
        "held_out_tokens": len(held_ids),
        "held_out_files": [d.path for d in corpus.held_out],
        "held_out_digest": corpus.digest(),
        "parameters": sum(v.numel() for v in sd.values()),
        "architecture": mc.architecture,
        "kv_layers": list(mc.kv_layers),
        "final_train_loss": log["loss"][-1][1] if log["loss"] else None,
        "final_eval_loss": log["eval"][-1][1] if log["eval"] else None,
        "log": log,
    }
    (out / "training_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    if state_path.exists():
        state_path.unlink()  # finished: the checkpoint is the state
    return summary
