"""Writes the model card (README.md) of a trained reference checkpoint from measured numbers."""

from __future__ import annotations

import json
from pathlib import Path


def _arch(summary: dict) -> str:
    arch = summary.get("architecture", "LlamaForCausalLM")
    c = summary["config"]
    if c.get("arch") != "lckv":
        return arch
    return (
        f"{arch} (layer-condensed KV: layers {summary['kv_layers']} keep KV, the others attend "
        f"to layer {summary['kv_layers'][-1 - c['lckv_warmup'] // 2]}'s; {c['lckv_warmup']} "
        f"warmup layers; trained and prompts encoded with m={c['lckv_passes_no_grad']} passes "
        f"without + b={c['lckv_passes_grad']} with gradient)"
    )


def write_model_card(out: Path, summary: dict, ppl: dict, name: str) -> None:
    c = summary["config"]
    lines = [
        f"# {name}",
        "",
        "zipserve's reference model: a small Llama trained from scratch on Python source so that",
        "KV-cache compression can be judged on real attention structure. Written by",
        "`zipserve train`; every number below was measured by that run or by `zipserve eval ppl`.",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {_arch(summary)}, {c['num_layers']} layers, hidden {c['hidden_size']}, "
        f"{c['num_heads']} query / {c['num_kv_heads']} KV heads, head_dim {c['head_dim']}, "
        f"MLP {c['intermediate_size']}, RoPE theta {c['rope_theta']:g}, tied embeddings |",
        f"| parameters | {summary['parameters']:,} (bf16 safetensors) |",
        f"| tokenizer | byte-level BPE, {c['vocab_size']} tokens, trained on the training split |",
        f"| corpus | `{summary['corpus_root']}` (.py/.txt/.md/.rst, deduplicated by content, "
        "site-packages excluded) |",
        f"| training split | {summary['corpus_train_tokens']:,} tokens |",
        f"| held-out split | {', '.join(summary['held_out_files'])} "
        f"({summary['held_out_tokens']:,} tokens, digest {summary['held_out_digest']}) |",
        f"| training | {summary['steps']} steps x {c['batch_size']} x {c['seq_len']} tokens = "
        f"{summary['train_tokens_seen']:,} tokens, AdamW lr {c['lr']:g} cosine, seed {c['seed']} |",
        f"| time, device | {summary['train_seconds']:.0f} s on {summary['device']} |",
        f"| final loss | train {summary['final_train_loss']:.3f}, held-out "
        f"{summary['final_eval_loss']:.3f} (first windows) |",
        f"| held-out perplexity | **{ppl['perplexity']:.3f}** over {ppl['tokens']:,} tokens "
        f"(context {ppl['context']}, stride {ppl['stride']}, {ppl['dtype']}, {ppl['device']}) |",
        "",
        "Reproduce (on the lent GPU; see training_log.json for the full config and loss curve):",
        "```",
        summary.get("command", "zipserve train"),
        f"zipserve eval ppl --model {out} --context {ppl['context']} --stride {ppl['stride']}",
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
    (out / "eval_ppl.json").write_text(json.dumps(ppl, indent=1) + "\n")


def measure_and_write_card(
    out: str | Path, summary: dict, seq_len: int, text_dir: str | None, device: str | None
) -> dict:
    """After `train`: the checkpoint's held-out perplexity (context: its training length, at
    most 1024; stride half of it; float32) and its model card at out/README.md; returns the
    perplexity record."""
    from zipserve.train.evaluate import eval_ppl

    context = min(seq_len, 1024)
    ppl = eval_ppl(str(out), text_dir, context, context // 2, "float32", device)
    write_model_card(Path(out), summary, ppl, Path(out).name)
    return ppl
