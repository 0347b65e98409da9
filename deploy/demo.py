"""`zipserve demo`: start the whole system per codec, send real prompts over HTTP, print a JCT table.

What it is meant to show, honestly, on a 2-core CPU in about two minutes: the KV of a prompt of
several pages crosses an emulated link between the prefill and the decode worker, compressed codecs
send a fraction of the bytes, and that shortens the job. The prompts are real Python source (the
stdlib of the running interpreter), several KV pages long. The link is scaled to the model: the
shipped reference model's KV per token is tens of times smaller than Llama-3-8B's, so the default
link stands for a 10 Gb/s link serving Llama-3-8B (the table says which). Byte ratios are against
what the `bf16` codec sent for the same prompt, i.e. dense KV in the engine's dtype (fp32 on the
CPU), like with like.
"""

from __future__ import annotations

import importlib
import inspect
import time
from dataclasses import dataclass

from zipserve.control.config import ServeConfig
from zipserve.deploy.http_client import get_json, post_json, stream_text
from zipserve.deploy.serve import running_server
from zipserve.engine.config import RANDOM_MODELS
from zipserve.engine.loading import model_config_for

DEMO_MODULES = ("textwrap", "shlex", "fnmatch", "difflib")
"""Stdlib modules whose source makes the demo prompts (present in every CPython 3.10+)."""
PROMPT_CHARS = 3000
"""About 800-900 tokens of the reference model's BPE: 13-14 KV pages of 64 tokens."""
REFERENCE_LINK_GBPS = 10.0
"""The link the default emulated link stands for, when serving Llama-3-8B."""


@dataclass(frozen=True)
class DemoRow:
    codec: str
    prompt: str
    job: dict
    decode_kv: str = "-"
    """What the decode worker kept: compressed, or dense (the codec's values in bf16 pages)."""


def demo_prompts(modules: tuple[str, ...] = DEMO_MODULES, chars: int = PROMPT_CHARS) -> list[str]:
    """A piece of each module's source: from its first top-level def/class, cut at a line end
    after `chars` characters (the model continues real code)."""
    prompts = []
    for name in modules:
        src = inspect.getsource(importlib.import_module(name))
        start = min((i for i in (src.find("\ndef "), src.find("\nclass ")) if i >= 0), default=0)
        piece = src[start + 1 : start + 1 + chars]
        prompts.append(piece[: piece.rfind("\n") + 1])
    return prompts


def scaled_link_gbps(model: str, reference_gbps: float = REFERENCE_LINK_GBPS) -> float:
    """The link at which `model`'s dense bf16 KV takes as long per token as Llama-3-8B's does
    at `reference_gbps`."""
    ratio = model_config_for(model).kv_bytes_per_token(2) / RANDOM_MODELS[
        "llama3-8b"
    ].kv_bytes_per_token(2)
    return reference_gbps * ratio


def demo(
    model: str,
    codecs: list[str],
    max_tokens: int,
    port: int,
    link_gbps: float | None,
    decode_kv: list[str] | tuple[str, ...] = ("auto",),
    engine_options: dict | None = None,
) -> list[DemoRow]:
    """For each codec (in each decode_kv mode): start the system, stream the first prompt's
    continuation to the terminal, send every prompt, and collect each job's phases from
    /v1/jobs/{id}."""
    from zipserve.engine.decode_kv import codec_modes

    runs, skipped = codec_modes(codecs, decode_kv)
    for note in skipped:
        print(f"(skipped {note})")
    prompts = demo_prompts()
    print(
        f"zipserve demo: {len(prompts)} prompts of real Python source "
        f"({', '.join(DEMO_MODULES)}), {max_tokens} tokens each; link "
        + (f"{link_gbps:.3g} Gb/s emulated" if link_gbps else "not limited")
    )
    rows = []
    for codec, mode in runs:
        cfg = ServeConfig(
            model=model,
            codec=codec,
            link_gbps=link_gbps,
            decode_kv=mode,
            engine_options=dict(engine_options or {}),
        )
        print(
            f"\n=== codec {codec}, decode-kv {mode}: starting Ray, 1 prefill + 1 decode "
            f"worker, router ..."
        )
        with running_server(cfg, "127.0.0.1", port) as (base, backend):
            url = f"{base}/v1/completions"
            tail = "".join(prompts[0].splitlines(keepends=True)[-3:])
            print(f"--- streaming the continuation of {DEMO_MODULES[0]}.py (last lines shown):")
            print(tail, end="")
            stream_text(
                url,
                {"prompt": prompts[0], "max_tokens": max_tokens, "temperature": 0},
                timeout=300,
                echo=True,
            )
            for prompt in prompts:
                out = post_json(
                    url, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}, timeout=300
                )
                rows.append(
                    DemoRow(
                        codec,
                        prompt,
                        get_json(f"{base}/v1/jobs/{out['id']}"),
                        str(backend.decode_kv),
                    )
                )
        time.sleep(0.5)
    print_table(rows)
    print_caveats(model, link_gbps)
    return rows


def print_table(rows: list[DemoRow]) -> None:
    phases = ["queue", "prefill", "transfer", "decode_queue", "decode"]
    sent_by_bf16 = {r.prompt: r.job.get("kv_bytes") for r in rows if r.codec == "bf16"}
    print(
        "\n| codec | decode KV | prompt tok | out tok | "
        + " | ".join(f"{p} ms" for p in phases)
        + " | TTFT ms | JCT ms | held by decode | KV sent | vs bf16 codec |"
    )
    print("|---|---|---|---|" + "---|" * len(phases) + "---|---|---|---|---|")
    for r in rows:
        j = r.job
        ttft, jct, sent = j.get("ttft"), j.get("jct"), j.get("kv_bytes")
        if ttft is None or jct is None:
            print(f"| {r.codec} | job record incomplete: {j} |")
            continue
        durations = {p["name"]: p.get("duration") for p in j.get("phases", [])}
        cells = [
            f"{1e3 * durations[p]:.1f}" if durations.get(p) is not None else "-" for p in phases
        ]
        base = sent_by_bf16.get(r.prompt)
        ratio = f"{sent / base:.2f}x" if sent is not None and base else "-"
        kib = f"{sent / 1024:.1f} KiB" if sent is not None else "-"
        print(
            f"| {r.codec} | {r.decode_kv} | {j.get('prompt_tokens')} | "
            f"{j.get('completion_tokens')} | "
            + " | ".join(cells)
            + f" | {1e3 * ttft:.1f} | {1e3 * jct:.1f} | {_held(j)} | {kib} | {ratio} |"
        )
    if any(j.get("kv_cached_tokens") for j in (r.job for r in rows)):
        print(
            "\n'held by decode': prompt tokens whose KV the decode worker's prefix cache already "
            "held (the first prompt was streamed before the timed sends), so they did not cross "
            "the link; 'local': the rest was prefilled on the decode worker, nothing was sent."
        )
    means = {}
    for r in rows:
        if r.job.get("jct") is not None:
            name = (
                r.codec
                if r.decode_kv in ("-", "compressed") or r.codec == "bf16"
                else f"{r.codec}/{r.decode_kv}"
            )
            means.setdefault(name, []).append(r.job["jct"])
    if "bf16" in means:
        base = sum(means["bf16"]) / len(means["bf16"])
        print(
            "\nmean JCT vs bf16: "
            + ", ".join(f"{c} {sum(v) / len(v) / base:.2f}x" for c, v in means.items())
        )


def _held(job: dict) -> str:
    """Prompt tokens the decode worker held in its prefix cache ('local' when it prefilled the
    rest itself); '-' when the record has no such field."""
    held = job.get("kv_cached_tokens")
    if held is None:
        return "-"
    return f"{held} (local)" if job.get("local_prefill") else str(held)


def print_caveats(model: str, link_gbps: float | None) -> None:
    import torch

    notes = []
    if link_gbps:
        notes.append(
            f"The link is emulated at {link_gbps:.3g} Gb/s: per token this model's KV "
            f"takes as long as Llama-3-8B's on a "
            f"{link_gbps / scaled_link_gbps(model, 1.0):.3g} Gb/s link."
        )
    if not torch.cuda.is_available():
        notes.append(
            "CPU: the engine runs in fp32, so the bf16 codec sends fp32 pages here; "
            "ratios are against what it sent. decode KV dense: the codec's KV crosses "
            "the link compressed and is dequantized into dense pages (bf16 on a GPU) "
            "on arrival, then decoded by the bf16 kernel (auto picks it on the CPU, where attention on "
            "compressed pages runs through torch references of the GPU kernels; their "
            "decode times say nothing about GPU speed: bench/RESULTS.md)."
        )
    for n in notes:
        print(f"note: {n}")
