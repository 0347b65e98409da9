"""HACK decode attention, Triton against CUDA backend, on the GPU: correctness, then speed.

`python3 -m zipserve.bench.hack_backends [--out DIR]` (needs an sm_90 GPU)

1. Correctness: both backends against the torch reference (kernels/hack_decode_reference.py, f16
   mode) on random pools: ragged lengths 0..577 (padding rows, sinks, a partial page), GQA 4 and 8,
   2 and 4 bits, 1-9 splits, with and without the Hadamard rotation.  Also: registers and local
   (spill) bytes of each CUDA function as the driver loaded it.
2. Speed: one layer of Llama-3-8B heads (32 q / 8 kv, d = 128, pages of 64, a 36-token tail), GPU
   time per call from CUDA-graph replays: torch SDPA on bf16 K/V, the paged bf16 kernel, and each
   HACK backend (Triton; every CUDA variant at its default splits, some also at other split
   counts: SPLIT_FACTORS); the ratio to SDPA and the stored bytes each call reads per second.
   Table last, then the fastest variant per bit width; CSV under --out.
"""

from __future__ import annotations

import argparse
import csv
import os
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from zipserve.bench.kernel_bench import _time
from zipserve.compress.rotation import hadamard
from zipserve.kernels import hack_decode_cuda
from zipserve.kernels.hack_decode_attention import hack_decode_attention, hack_num_splits
from zipserve.kernels.hack_decode_reference import hack_decode_attention_ref
from zipserve.kernels.hack_layout import HackPages
from zipserve.kernels.paged_decode_attention import choose_num_splits, paged_decode_attention

H, KVH, D, P = 32, 8, 128, 64
TAIL = 36


def _pool(n_pages: int, kvh: int, bits: int, gen, dev) -> HackPages:
    pool = HackPages.empty(n_pages, kvh, P, D, bits, D * bits // 8, device=dev)
    pool.k_codes.random_(0, 256, generator=gen)
    pool.v_codes.random_(0, 256, generator=gen)
    pool.k_scale.uniform_(0.02, 0.3, generator=gen)
    pool.k_min.uniform_(-1.5, 0.0, generator=gen)
    pool.v_scale.uniform_(0.02, 0.3, generator=gen)
    pool.v_min.uniform_(-1.0, 0.0, generator=gen)
    return pool


def _rel(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def _set_variant(backend: str) -> None:
    """ "cuda-v2" -> the CUDA kernel variant v2 for the calls that follow."""
    if backend.startswith("cuda-"):
        os.environ[hack_decode_cuda.VARIANT_ENV] = backend.split("-", 1)[1]


def correctness(variants: list[str]) -> list[dict]:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    cases = [
        ([577, 0, 1, 64, 65, 128 + 5], 2, 4, 3, False),
        ([577, 0, 1, 64, 65, 128 + 5], 4, 4, 3, False),
        ([4096, 700, 63], 2, 4, 9, True),
        ([4096, 700, 63], 4, 4, 9, True),
        ([1000, 300], 2, 8, 1, True),
        ([1000, 300], 4, 8, 2, False),
        ([2048], 2, 1, 5, True),
    ]
    for lens, bits, group, splits, rot in cases:
        kvh, h = 2, 2 * group
        n_full = [n // P for n in lens]
        total = sum(n_full) + 3
        pool = _pool(total, kvh, bits, gen, dev)
        perm = torch.randperm(total, device=dev, generator=gen).to(torch.int32)
        table = torch.full((len(lens), max(max(n_full), 1) + 1), -1, dtype=torch.int32, device=dev)
        used = 0
        for b, n in enumerate(n_full):
            table[b, :n] = perm[used : used + n]
            used += n
        n_pages = torch.tensor(n_full, dtype=torch.int32, device=dev)
        dense_lens = torch.tensor(
            [min(4, n) + (n - f * P if f else 0) if f else n for n, f in zip(lens, n_full)],
            dtype=torch.int32,
            device=dev,
        )
        dk = torch.randn(len(lens), kvh, 4 + P, D, device=dev, dtype=torch.bfloat16, generator=gen)
        dv = torch.randn_like(dk)
        q = torch.randn(len(lens), h, D, device=dev, dtype=torch.bfloat16, generator=gen)
        r = hadamard(D, dev) if rot else None
        args = (q, pool, table, n_pages, dk, dv, dense_lens, D**-0.5, bits)
        ref = hack_decode_attention_ref(*args, num_splits=splits, rotation=r)
        for backend in ("triton", *(f"cuda-{v}" for v in variants)):
            _set_variant(backend)
            out = hack_decode_attention(
                *args, num_splits=splits, rotation=r, backend=backend.split("-")[0]
            )
            torch.cuda.synchronize()
            pad = [b for b, n in enumerate(lens) if n == 0]
            row = dict(
                backend=backend,
                bits=bits,
                group=group,
                splits=splits,
                rotation=rot,
                lens=" ".join(map(str, lens)),
                rel_err=_rel(out, ref),
                finite=bool(torch.isfinite(out).all()),
                padding_zero=all(bool((out[b] == 0).all()) for b in pad),
            )
            rows.append(row)
            print("check", row, flush=True)
    for var in variants:
        for bits in (2, 4):
            name = hack_decode_cuda.function_name(bits, var)
            smem = hack_decode_cuda.shared_bytes(var, bits)
            attrs = hack_decode_cuda.CUBIN.attributes(name, dev)
            print(f"{name}: {attrs}, dynamic shared {smem} B per block", flush=True)
    return rows


# Besides its default splits (one wave of resident warps), a variant is also timed at these
# multiples: v2 / v2o3 at twice (more warps in flight helped v2 in session 8), the shared-memory
# variants at half (longer splits keep their pipeline full for more pages).
SPLIT_FACTORS = {"v2": (1, 2), "v2o3": (1, 2), "v2s2": (1, 0.5), "v2s3": (1, 0.5)}


def speed(cells, variants: list[str]) -> list[dict]:
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    rows = []
    for batch, ctx in cells:
        gen = torch.Generator(device=dev).manual_seed(batch * 7 + ctx)
        q = torch.randn(batch, H, D, device=dev, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(batch, KVH, ctx, D, device=dev, dtype=torch.bfloat16, generator=gen)
        v = torch.randn_like(k)
        kv_bytes = 2 * batch * KVH * ctx * D * 2
        cell = []
        us = _time(
            partial(
                F.scaled_dot_product_attention, q[:, :, None], k, v, scale=D**-0.5, enable_gqa=True
            )
        )
        cell.append(dict(variant="sdpa-bf16", splits=0, us=us, bytes=kv_bytes))
        n_full = ctx // P
        pages = batch * n_full
        kc = k.view(batch, KVH, n_full, P, D).permute(0, 2, 1, 3, 4).reshape(pages, KVH, P, D)
        vc = v.view(batch, KVH, n_full, P, D).permute(0, 2, 1, 3, 4).reshape(pages, KVH, P, D)
        del k, v
        table = torch.arange(pages, device=dev, dtype=torch.int32).view(batch, n_full)
        lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
        sp = choose_num_splits(batch, KVH, ctx, num_sms=sms)
        us = _time(partial(paged_decode_attention, q, kc, vc, table, lens, D**-0.5, num_splits=sp))
        cell.append(dict(variant="paged-bf16", splits=sp, us=us, bytes=kv_bytes))
        del kc, vc
        torch.cuda.empty_cache()
        n_f = torch.full((batch,), n_full, device=dev, dtype=torch.int32)
        dk = torch.randn(batch, KVH, 4 + P, D, device=dev, dtype=torch.bfloat16, generator=gen)
        dv = torch.randn_like(dk)
        dl = torch.full((batch,), TAIL, device=dev, dtype=torch.int32)
        rot = hadamard(D, dev)
        for bits in (2, 4):
            pool = _pool(pages, KVH, bits, gen, dev)
            read = (
                pages * KVH * P * (2 * D * bits // 8 + 4 * D // P + 4 * (8 // bits))
            )  # 88 / 144 B
            st = hack_num_splits(batch, KVH, ctx, sms)
            plans = [("triton", st)]
            for var in variants:
                os.environ[hack_decode_cuda.VARIANT_ENV] = var
                sc = hack_num_splits(batch, KVH, ctx, sms, backend="cuda", bits=bits)
                factors = SPLIT_FACTORS.get(var, (1,))
                plans += [(f"cuda-{var}", max(1, round(sc * m))) for m in factors]
            for backend, splits in plans:
                _set_variant(backend)
                us = _time(
                    partial(
                        hack_decode_attention,
                        q,
                        pool,
                        table,
                        n_f,
                        dk,
                        dv,
                        dl,
                        D**-0.5,
                        bits,
                        num_splits=splits,
                        rotation=rot,
                        backend=backend.split("-")[0],
                    )
                )
                cell.append(dict(variant=f"hack{bits}/{backend}", splits=splits, us=us, bytes=read))
            del pool
            torch.cuda.empty_cache()
        base = cell[0]["us"]
        for r in cell:
            r.update(
                batch=batch, context=ctx, x_sdpa=base / r["us"], tbps=r["bytes"] / r["us"] / 1e6
            )
            print("time", r, flush=True)
        rows.extend(cell)
    return rows


def best_variants(rows: list[dict]) -> dict[int, tuple[str, float]]:
    """Per bit width, the CUDA variant (at its default splits) with the highest geometric mean
    of x SDPA over the cells timed, and that mean: the default to pick from one run."""
    import math

    logs: dict[tuple[int, str], list[float]] = {}
    splits_seen: dict[tuple[int, int, int, str], int] = {}
    for r in rows:
        name = r["variant"]
        if not name.startswith("hack") or "/cuda-" not in name:
            continue
        bits, var = int(name[4]), name.split("/cuda-")[1]
        cell = (bits, r["batch"], r["context"], var)
        if cell in splits_seen:  # a second entry of a variant in a cell: more splits, not default
            continue
        splits_seen[cell] = r["splits"]
        logs.setdefault((bits, var), []).append(math.log(r["x_sdpa"]))
    best: dict[int, tuple[str, float]] = {}
    for (bits, var), xs in logs.items():
        mean = math.exp(sum(xs) / len(xs))
        if bits not in best or mean > best[bits][1]:
            best[bits] = (var, mean)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("hack_backends"))
    ap.add_argument("--cells", default="8x32768,1x131072,32x8192,8x4096,64x8192")
    ap.add_argument(
        "--variants",
        default=",".join(hack_decode_cuda.VARIANTS),
        help="CUDA kernel variants to check and time (default: all)",
    )
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(hack_decode_cuda.VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {unknown}; known: {list(hack_decode_cuda.VARIANTS)}")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    name = torch.cuda.get_device_name()
    os.makedirs(args.out, exist_ok=True)
    checks = correctness(variants)
    cells = [tuple(int(x) for x in c.split("x")) for c in args.cells.split(",")]
    rows = speed(cells, variants)
    for fname, data in (("checks.csv", checks), ("times.csv", rows)):
        with open(args.out / fname, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(data[0]) + ["device"])
            w.writeheader()
            w.writerows(dict(r, device=name) for r in data)
    print(f"\ndevice: {name}")
    print("\n| backend | bits | G | splits | rotation | lens | rel err | finite | pad zero |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in checks:
        print(
            f"| {r['backend']} | {r['bits']} | {r['group']} | {r['splits']} | {r['rotation']} | "
            f"{r['lens']} | {r['rel_err']:.1e} | {r['finite']} | {r['padding_zero']} |"
        )
    print("\n| B | context | variant | splits | us | x SDPA | stored TB/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['context']} | {r['variant']} | {r['splits']} | {r['us']:.1f} | "
            f"{r['x_sdpa']:.2f} | {r['tbps']:.2f} |"
        )
    for bits, (var, mean) in sorted(best_variants(rows).items()):
        print(
            f"hack{bits}: fastest CUDA variant over these cells: {var} ({mean:.2f}x SDPA, "
            f"geomean; kernels/hack_decode_cuda.py DEFAULT_VARIANTS[{bits}] is "
            f"{hack_decode_cuda.DEFAULT_VARIANTS[bits]})"
        )


if __name__ == "__main__":
    main()
