"""`zipserve bench kernels`: decode attention per codec against torch SDPA on bf16 KV, and page
encode bandwidth, on Llama-3-8B head shapes (32 query / 8 KV heads, head_dim 128), one layer.

Each row times one decode-attention call (GPU time: the call is captured in a CUDA graph and
replayed, as the engine's decode step is) for a batch whose every sequence holds `context` tokens
(full pages + a 36-token 16-bit tail of 4 sinks and a 32-token open page). All variants of a
(batch, context) cell run in the same process back to back; speedups are ratios to SDPA there.
Also timed: chunked prefill, a PREFILL_CHUNK-token chunk over PREFILL_PAST cached tokens, per codec
with a prefill kernel (codec.prefill_attention) against SDPA on bf16 K/V (lower-right causal).
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.nn.functional as F

from zipserve.bench.plotting import pyplot
from zipserve.compress.codecs import make_codec
from zipserve.kernels.paged_decode_attention import (
    choose_num_splits,
    paged_decode_attention,
)

H, KVH, D, P = 32, 8, 128, 64
TAIL = 32  # open-page tokens per sequence
PREFILL_CHUNK, PREFILL_PAST = 2048, 30720
SHAPES_OF = "random:llama3-8b"
"""The random model of these head shapes: calibrated codecs read its synthetic calibration
(lowrank: random orthonormal bases of rank 64, half of D; hack2mix: 2 bits on the first layer)."""


def _make(name: str):
    """The first layer's codec at the bench geometry (nothing to calibrate on random weights)."""
    return make_codec(name, KVH, P, D, model_dir=SHAPES_OF).for_layer(0)


def _time(fn, iters: int = 20, warmup: int = 3) -> float:
    """GPU microseconds per call of fn, replayed from a CUDA graph so that host-side Python
    (argument checks, launches) is not counted: the engine runs decode steps from graphs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):  # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        graph.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters * 1e3


def _cell(batch: int, context: int, codecs: list[str], sms: int) -> list[dict]:
    dev = torch.device("cuda")
    n_full = context // P
    scale = D**-0.5
    gen = torch.Generator(device=dev).manual_seed(batch * 7 + context)
    q = torch.randn(batch, H, D, device=dev, dtype=torch.bfloat16, generator=gen)
    rows = []

    # torch SDPA over contiguous bf16 K/V [B, KVH, L, D]
    k = torch.randn(batch, KVH, context, D, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    us = _time(
        lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)
    )
    kv_bytes = 2 * batch * KVH * context * D * 2
    rows.append(dict(variant="sdpa-bf16", us=us, kv_bytes=kv_bytes))

    # zipserve's paged bf16 kernel (the engine's plain path)
    pages = batch * n_full
    kc = k.view(batch, KVH, n_full, P, D).permute(0, 2, 1, 3, 4).reshape(pages, KVH, P, D)
    vc = v.view(batch, KVH, n_full, P, D).permute(0, 2, 1, 3, 4).reshape(pages, KVH, P, D)
    table = torch.arange(pages, device=dev, dtype=torch.int32).view(batch, n_full)
    lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
    splits = choose_num_splits(batch, KVH, context, num_sms=sms)
    us = _time(lambda: paged_decode_attention(q, kc, vc, table, lens, scale, num_splits=splits))
    rows.append(dict(variant="paged-bf16", us=us, kv_bytes=kv_bytes))
    del k, v

    n_f = torch.full((batch,), n_full, device=dev, dtype=torch.int32)
    dense_k = torch.randn(batch, KVH, 4 + P, D, device=dev, dtype=torch.bfloat16, generator=gen)
    dense_v = torch.randn_like(dense_k)
    dense_lens = torch.full((batch,), 4 + TAIL, device=dev, dtype=torch.int32)
    for name in codecs:
        codec = _make(name)
        store = codec.new_store(pages, dev)
        for s in range(0, pages, 4096):  # encode the bf16 pages into the codec's store
            ids = torch.arange(s, min(s + 4096, pages), device=dev)
            codec.encode(store, ids, kc[ids], vc[ids])
        torch.cuda.synchronize()
        cs = codec.num_splits(batch, context, sms)
        us = _time(
            lambda: codec.decode_attention(
                q, store, table, n_f, dense_k, dense_v, dense_lens, scale, num_splits=cs
            )
        )
        stored = codec.store_nbytes(store) * n_full * batch // pages
        rows.append(dict(variant=name, us=us, kv_bytes=stored, splits=cs))
        del store
    del kc, vc
    torch.cuda.empty_cache()
    base = rows[0]["us"]
    for r in rows:
        r.setdefault("splits", splits)
        r.update(
            batch=batch,
            context=context,
            speedup_vs_sdpa=base / r["us"],
            tbps=r["kv_bytes"] / (r["us"] * 1e-6) / 1e12,
        )
    return rows


def _encode_rows(codecs: list[str], pages: int = 8192) -> list[dict]:
    dev = torch.device("cuda")
    k = torch.randn(pages, KVH, P, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    ids = torch.arange(pages, device=dev)
    rows = []
    for name in codecs:
        codec = _make(name)
        store = codec.new_store(pages, dev)
        us = _time(lambda: codec.encode(store, ids, k, v), iters=10)
        moved = 2 * k.numel() * 2 + codec.store_nbytes(store)
        rows.append(
            dict(codec=name, pages=pages, us=us, bytes_moved=moved, tbps=moved / (us * 1e-6) / 1e12)
        )
    return rows


def _prefill_rows(codecs: list[str]) -> list[dict]:
    """One chunk of PREFILL_CHUNK tokens over PREFILL_PAST cached ones (one layer, one sequence)."""
    from torch.nn.attention.bias import causal_lower_right

    from zipserve.compress.codec import KVCodec

    dev, n, past, scale = torch.device("cuda"), PREFILL_CHUNK, PREFILL_PAST, D**-0.5
    gen = torch.Generator(device=dev).manual_seed(5)
    q = torch.randn(n, H, D, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(past + n, KVH, D, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    # SDPA: K/V repeated to H heads beforehand (not timed), chunk rows see the past + causal part
    kh = k.transpose(0, 1).repeat_interleave(H // KVH, 0)[None]  # [1, H, past + n, D]
    vh = v.transpose(0, 1).repeat_interleave(H // KVH, 0)[None]
    mask = causal_lower_right(n, past + n)
    qh = q.transpose(0, 1)[None]  # [1, H, n, D]
    base = _time(
        lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale), iters=10
    )
    rows = [dict(variant="sdpa-bf16", us=base)]
    m = past // P
    ids = torch.arange(m, device=dev)
    for name in codecs:
        codec = _make(name)
        if type(codec).prefill_attention is KVCodec.prefill_attention:
            continue  # dequantizing reference only: not a kernel
        store = codec.new_store(m, dev)
        codec.encode(
            store,
            ids,
            k[:past].view(m, P, KVH, D).transpose(1, 2).contiguous(),
            v[:past].view(m, P, KVH, D).transpose(1, 2).contiguous(),
        )
        sk, sv = k[: codec.n_sink].transpose(0, 1), v[: codec.n_sink].transpose(0, 1)
        us = _time(
            lambda: codec.prefill_attention(q, k[past:], v[past:], store, ids, sk, sv, scale),
            iters=10,
        )
        rows.append(dict(variant=name, us=us))
    for r in rows:
        r.update(chunk=n, past=past, speedup_vs_sdpa=base / r["us"])
    return rows


def run(out_dir: Path, codecs: list[str], batches: list[int], contexts: list[int]) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench kernels needs a CUDA GPU (run it on the lent device)")
    name = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for ctx in contexts:
        for b in batches:
            if b * ctx * KVH * D * 2 * 2 * 3 > 90e9:  # K/V + paged copy + codec stores
                print(f"skip B={b} ctx={ctx}: does not fit with all variants")
                continue
            cell = _cell(b, ctx, codecs, sms)
            rows.extend(cell)
            print(
                f"B={b} ctx={ctx}: "
                + ", ".join(
                    f"{r['variant']} {r['us']:.0f}us ({r['speedup_vs_sdpa']:.2f}x)" for r in cell
                ),
                flush=True,
            )
    enc = _encode_rows(codecs)
    pre = _prefill_rows(codecs)
    print(f"\ndevice: {name}; one layer of Llama-3-8B heads ({H} q / {KVH} kv, d={D}); page {P}")
    print("\n| batch | context | variant | us | speedup vs SDPA | stored KV TB/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['context']} | {r['variant']} | {r['us']:.1f} | "
            f"{r['speedup_vs_sdpa']:.2f}x | {r['tbps']:.2f} |"
        )
    print("\n| encode | pages | us | bytes read+written | TB/s |")
    print("|---|---|---|---|---|")
    for r in enc:
        print(
            f"| {r['codec']} | {r['pages']} | {r['us']:.0f} | {r['bytes_moved'] / 1e9:.2f} GB | "
            f"{r['tbps']:.2f} |"
        )
    print("\n| prefill chunk over compressed past | chunk | past | us | speedup vs SDPA |")
    print("|---|---|---|---|---|")
    for r in pre:
        print(
            f"| {r['variant']} | {r['chunk']} | {r['past']} | {r['us']:.0f} | "
            f"{r['speedup_vs_sdpa']:.2f}x |"
        )
    with open(out_dir / "kernels_prefill.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(pre[0]) + ["device"])
        w.writeheader()
        w.writerows(dict(r, device=name) for r in pre)
    with open(out_dir / "kernels_decode.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["device"])
        w.writeheader()
        w.writerows(dict(r, device=name) for r in rows)
    with open(out_dir / "kernels_encode.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(enc[0]) + ["device"])
        w.writeheader()
        w.writerows(dict(r, device=name) for r in enc)
    _plot(rows, out_dir / "kernels_decode.png", name)


def _plot(rows: list[dict], path: Path, device: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    cells = sorted({(r["batch"], r["context"]) for r in rows})
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows)]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(variants)
    for i, var in enumerate(variants):
        ys = [
            next(
                (
                    r["speedup_vs_sdpa"]
                    for r in rows
                    if (r["batch"], r["context"]) == c and r["variant"] == var
                ),
                0,
            )
            for c in cells
        ]
        ax.bar([j + i * width for j in range(len(cells))], ys, width, label=var)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cells))])
    ax.set_xticklabels([f"B{b}\n{c // 1024}k" for b, c in cells])
    ax.axhline(1, color="gray", lw=0.8)
    ax.set_ylabel("speedup vs torch SDPA (bf16)")
    ax.set_title(f"decode attention, one layer, {device}")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
