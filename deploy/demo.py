"""`zipserve demo`: start the whole system per codec, send real prompts over HTTP, print a JCT table.

What it is meant to show, honestly, on a 2-core CPU in about two minutes: the KV of a prompt of
several pages crosses an emulated link between the prefill and the decode worker, compressed codecs
send a fraction of the bytes, and that shortens the job. The prompts are real Python source (the
stdlib of the running interpreter), several KV pages long. The default link is calibrated to this machine: the first system
started times one prefill, then the link is set so that a prompt's dense KV takes as many times
its prefill on the wire as Llama-3-8B's does at 10 Gb/s on an H100 (about 3x), so that the
link weighs in a job here as it would there (a CPU prefills the small reference model slowly,
and a link scaled per token alone would hide behind it). Byte ratios are against
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
CALIBRATION_MODULE = "calendar"
"""The stdlib module whose source makes the prompt the link is calibrated with (not timed)."""
H100_PREFILL_S_8K = 0.289
"""bf16 prefill of 8192 tokens of random Llama-3-8B on an H100 (session 11, bench/RESULTS.md:
`prefill_profile`)."""
WIRE_TO_PREFILL = (
    8192 * RANDOM_MODELS["llama3-8b"].kv_bytes_per_token(2) * 8 / (REFERENCE_LINK_GBPS * 1e9)
) / H100_PREFILL_S_8K
"""How many times its prefill a prompt's bf16 KV takes on the reference link there (~2.97)."""


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


def calibrated_link_gbps(
    dense_bytes_per_token: float, prefill_s_per_token: float, ratio: float = WIRE_TO_PREFILL
) -> float:
    """The link on which a prompt's dense KV takes `ratio` times its prefill."""
    if dense_bytes_per_token <= 0 or prefill_s_per_token <= 0 or ratio <= 0:
        raise ValueError("calibration needs positive bytes, prefill time and ratio")
    return dense_bytes_per_token * 8 / (ratio * prefill_s_per_token) / 1e9


def dense_element_size() -> int:
    """Bytes per value of the engine's dense KV here: bf16 on a GPU, fp32 on the CPU."""
    import torch

    return 2 if torch.cuda.is_available() else 4


def dense_bytes_per_token(model: str) -> int:
    """What `model`'s dense KV of one token takes as this engine sends it (bf16 codec)."""
    return model_config_for(model).kv_bytes_per_token(dense_element_size())


def llama_equivalent_gbps(model: str, link_gbps: float) -> float:
    """The link on which Llama-3-8B's bf16 KV takes as long per token as `model`'s dense KV,
    as this engine sends it, takes on `link_gbps`."""
    llama = RANDOM_MODELS["llama3-8b"].kv_bytes_per_token(2)
    return link_gbps * llama / dense_bytes_per_token(model)


def _calibrate(model: str, url: str, base: str, backend, max_tokens: int) -> float:
    """Time one prefill on the running system (link unlimited), set the calibrated link on
    it and return it."""
    prompt = demo_prompts((CALIBRATION_MODULE,))[0]
    out = post_json(
        url, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}, timeout=300
    )
    job = get_json(f"{base}/v1/jobs/{out['id']}")
    prefill = {p["name"]: p.get("duration") for p in job.get("phases", [])}.get("prefill")
    tokens = job.get("prompt_tokens")
    if not prefill or not tokens:
        raise RuntimeError(f"calibration: the job record has no prefill time: {job}")
    link = calibrated_link_gbps(dense_bytes_per_token(model), prefill / tokens)
    backend.set_link(link)
    print(
        f"--- link calibrated: a prefill of {tokens} tokens took {1e3 * prefill:.0f} ms here, "
        f"so the link is set to {link:.3g} Gb/s, on which its dense KV takes "
        f"{WIRE_TO_PREFILL:.1f}x that (Llama-3-8B's on an H100 at 10 Gb/s)"
    )
    return link


def demo(
    model: str,
    codecs: list[str],
    max_tokens: int,
    port: int,
    link_gbps: float | None,
    decode_kv: list[str] | tuple[str, ...] = ("auto",),
    engine_options: dict | None = None,
    calibrate: bool = False,
) -> list[DemoRow]:
    """For each codec (in each decode_kv mode): start the system, stream the first prompt's
    continuation to the terminal, send every prompt, and collect each job's phases from
    /v1/jobs/{id}. calibrate: the first system times a prefill and sets the link from it
    (`calibrated_link_gbps`), which every later system keeps (link_gbps is ignored)."""
    from zipserve.engine.decode_kv import codec_modes

    runs, skipped = codec_modes(codecs, decode_kv)
    for note in skipped:
        print(f"(skipped {note})")
    prompts = demo_prompts()
    if calibrate:
        link_gbps = None  # until the first system has timed its prefill
    print(
        f"zipserve demo: {len(prompts)} prompts of real Python source "
        f"({', '.join(DEMO_MODULES)}), {max_tokens} tokens each; link "
        + (
            "calibrated on the first system"
            if calibrate
            else f"{link_gbps:.3g} Gb/s emulated"
            if link_gbps
            else "not limited"
        )
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
            if calibrate and link_gbps is None:
                link_gbps = _calibrate(model, url, base, backend, max_tokens)
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
    print_caveats(model, link_gbps, calibrated=calibrate)
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


def print_caveats(model: str, link_gbps: float | None, calibrated: bool = False) -> None:
    import torch

    notes = []
    if link_gbps and calibrated:
        notes.append(
            f"The link is emulated at {link_gbps:.3g} Gb/s, calibrated so that a prompt's dense "
            f"KV takes {WIRE_TO_PREFILL:.1f}x its prefill on this machine, as Llama-3-8B's "
            f"does on an H100 at 10 Gb/s (8k tokens: {1e3 * H100_PREFILL_S_8K:.0f} ms of "
            f"prefill, {1e3 * WIRE_TO_PREFILL * H100_PREFILL_S_8K:.0f} ms on the wire). Per "
            f"token that is as slow as Llama-3-8B's KV on a "
            f"{llama_equivalent_gbps(model, link_gbps):.3g} Gb/s link; `--link-gbps` sets "
            f"it instead (0: unlimited)."
        )
    elif link_gbps:
        notes.append(
            f"The link is emulated at {link_gbps:.3g} Gb/s: per token this model's KV "
            f"takes as long as Llama-3-8B's on a "
            f"{llama_equivalent_gbps(model, link_gbps):.3g} Gb/s link."
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
