"""`zipserve bench disagg`: single long requests through a prefill worker and a decode worker that
share one device (in one process, KV over an in-process channel, optionally behind an emulated
link), per codec (and decode_kv mode of the decode worker: compressed, or dense = the codec's KV
dequantized into bf16 pages on arrival): TTFT, JCT, the gap from prefill end to decode start
(with dense, it includes dequantizing the last layer), and KV bytes sent (the same in every mode).
On a GPU the KV stays on the device (DeviceLayerKV over the in-process channel, checksum on the
GPU); kv_path="host" forces the old host-bytes staging for comparison (column `kv_path`).

This is the one-GPU measurement of issue 5 without Ray or HTTP in the way; `zipserve demo`
exercises the same workers through Ray actors and the router.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch

from zipserve.decode_worker.worker import DecodeWorker
from zipserve.engine.sampling_params import SamplingParams
from zipserve.prefill_worker.worker import PrefillWorker
from zipserve.transfer.inprocess import InProcessChannel, InProcessHostChannel
from zipserve.transfer.kv_messages import use_device_form
from zipserve.transfer.link import LinkEmulator


def pre_vocab(model: str) -> int:
    from zipserve.engine.loading import model_config_for

    return min(model_config_for(model).vocab_size, 8000)


def one_request(
    pre: PrefillWorker, dec: DecodeWorker, rid: str, prompt: list[int], max_tokens: int
) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.time()
    dec.reserve(rid, prompt, params, deadline_s=120)
    rep = pre.prefill(rid, prompt, params, "d0")
    res = dec.admit(rid, rep.first_token, rep.first_logprob, timeout=120)
    t_first = time.time()
    while not res.finished:
        res = dec.poll(rid, 0, timeout=10)
    t_end = time.time()
    times = res.times
    dec.release(rid)
    return dict(
        ttft_ms=1e3 * (t_first - t0),
        jct_ms=1e3 * (t_end - t0),
        prefill_ms=1e3 * (rep.prefill_end - rep.prefill_start),
        gap_ms=1e3 * (times["admitted"] - rep.prefill_end),
        decode_ms=1e3 * (times["finished"] - times["admitted"]),
        kv_mb=rep.bytes_sent / 1e6,
        dense_mb=rep.dense_bytes / 1e6,
        tokens=len(res.tokens),
        error=res.error,
    )


def run(
    model: str,
    codecs: list[str],
    prompt_len: int,
    max_tokens: int,
    links: list,
    out_dir: Path,
    device: str | None = None,
    repeats: int = 2,
    kv_path: str = "auto",
    decode_kv: list[str] | tuple[str, ...] = ("compressed",),
) -> list[dict]:
    """kv_path: "auto" (device buffers on CUDA) or "host" (bytes through host memory);
    decode_kv: the modes each codec's decode worker runs in (bf16 once)."""
    from zipserve.engine.decode_kv import codec_modes

    if kv_path not in ("auto", "host"):
        raise ValueError(f"kv_path must be 'auto' or 'host', got {kv_path!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    pages = 2 * (prompt_len + max_tokens) // 64 + 8
    opts = dict(num_pages=pages, max_num_seqs=4, max_prefill_tokens=prompt_len)
    # the decode worker replays captured decode steps (every codec is graph safe now); the
    # prefill worker never decodes
    pre_opts, dec_opts = dict(opts, cuda_graphs=False), dict(opts, graph_batch_sizes=(1, 2, 4))
    vocab = pre_vocab(model)
    prompt = torch.randint(3, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0))
    rows = []
    lanes, skipped = codec_modes(codecs, decode_kv)
    for note in skipped:
        print(f"(skipped {note})")
    for codec, mode in lanes:
        pre = PrefillWorker(model, codec, dev, engine_options=pre_opts)
        dec = DecodeWorker(model, codec, dev, engine_options=dict(dec_opts, decode_kv=mode))
        mode = dec.engine.decode_kv  # auto resolved
        try:
            for gbps in links:
                a, b = (InProcessHostChannel if kv_path == "host" else InProcessChannel).pair()
                path = "device" if use_device_form(a, dev) else "host"
                sent_on = LinkEmulator(a, gbps=gbps) if gbps else a
                pre.attach("d0", sent_on)
                dec.attach(f"p{gbps}", b)
                one_request(pre, dec, f"warm-{gbps}", prompt.tolist()[:256], 2)  # warm up
                for r in range(repeats):
                    row = one_request(pre, dec, f"{codec}-{gbps}-{r}", prompt.tolist(), max_tokens)
                    row.update(
                        codec=codec,
                        decode_kv=mode,
                        link_gbps=gbps or "none",
                        repeat=r,
                        device=name,
                        kv_path=path,
                    )
                    rows.append(row)
                    print(
                        f"{codec:>6} {mode:>10} {path:>6} link {row['link_gbps']!s:>5}: "
                        f"TTFT {row['ttft_ms']:8.1f} "
                        f"ms  JCT {row['jct_ms']:8.1f} ms  gap {row['gap_ms']:7.1f} ms  "
                        f"KV {row['kv_mb']:.1f} MB",
                        flush=True,
                    )
                sent_on.close()  # the emulator's courier stops and `a` closes with it
        finally:
            dec.shutdown()
            del pre, dec
            if dev == "cuda":
                torch.cuda.empty_cache()
    print(f"\n{model}, {prompt_len}-token prompt, {max_tokens} tokens out, device {name}\n")
    print(
        "| codec | decode KV | KV path | link Gb/s | TTFT ms | JCT ms | prefill ms | "
        "prefill end -> decode start ms "
        "| decode ms | KV sent MB | dense MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["repeat"] == repeats - 1:
            print(
                f"| {r['codec']} | {r['decode_kv']} | {r['kv_path']} | {r['link_gbps']} | "
                f"{r['ttft_ms']:.1f} | "
                f"{r['jct_ms']:.1f} | "
                f"{r['prefill_ms']:.1f} | {r['gap_ms']:.1f} | {r['decode_ms']:.1f} | "
                f"{r['kv_mb']:.1f} | {r['dense_mb']:.1f} |"
            )
    with open(out_dir / "disagg.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows
