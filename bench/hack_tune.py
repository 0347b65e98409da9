"""Launch-configuration sweep of the HACK decode kernel on one bench cell (GPU only).

`python3 -m zipserve.bench.hack_tune [--batch 8 --context 32768 --bits 2]` times
hack_decode_attention for each (pages per step, padded group, warps, stages, splits, mode) in
a small grid, every call replayed from a CUDA graph (as `zipserve bench kernels` does), beside
torch SDPA on bf16 K/V in the same process, and prints one line per config with the achieved
bandwidth on stored (compressed) bytes. `--profile-once` runs the default config eagerly a few
times and exits: the entry point for `ncu`.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

import zipserve.kernels.hack_decode_attention as hack_attn
from zipserve.bench.kernel_bench import _time
from zipserve.compress.codecs import make_codec

H, KVH, D, P = 32, 8, 128, 64


def _setup(batch: int, context: int, bits: int):
    dev = torch.device("cuda")
    n_full = context // P
    pages = batch * n_full
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(batch, H, D, device=dev, dtype=torch.bfloat16, generator=gen)
    codec = make_codec(f"hack{bits}", KVH, P, D)
    store = codec.new_store(pages, dev)
    for s in range(0, pages, 4096):
        ids = torch.arange(s, min(s + 4096, pages), device=dev)
        k = torch.randn(ids.numel(), KVH, P, D, device=dev, dtype=torch.bfloat16, generator=gen)
        codec.encode(store, ids, k, torch.randn_like(k))
    table = torch.arange(pages, device=dev, dtype=torch.int32).view(batch, n_full)
    n_f = torch.full((batch,), n_full, device=dev, dtype=torch.int32)
    dense_k = torch.randn(batch, KVH, 4 + P, D, device=dev, dtype=torch.bfloat16, generator=gen)
    dense_v = torch.randn_like(dense_k)
    dense_lens = torch.full((batch,), 36, device=dev, dtype=torch.int32)
    pool = codec._pages(store)
    stored = codec.store_nbytes(store)
    return q, pool, table, n_f, dense_k, dense_v, dense_lens, stored, codec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--profile-once", action="store_true")
    a = ap.parse_args(argv)
    q, pool, table, n_f, dk, dv, dl, stored, codec = _setup(a.batch, a.context, a.bits)
    scale = D**-0.5
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    base_splits = codec.num_splits(a.batch, a.context, sms)
    default_cfg = hack_attn._launch_config

    def call(splits, mode):
        return hack_attn.hack_decode_attention(
            q, pool, table, n_f, dk, dv, dl, scale, a.bits, num_splits=splits, mode=mode
        )

    if a.profile_once:
        for mode in ("f16", "int8"):
            for _ in range(3):
                call(base_splits, mode)
        torch.cuda.synchronize()
        return

    k = torch.randn(a.batch, KVH, a.context, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    sdpa = _time(
        lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)
    )
    del k, v
    print(
        f"{torch.cuda.get_device_name()} B={a.batch} ctx={a.context} hack{a.bits}: SDPA bf16 "
        f"{sdpa:.1f} us; stored {stored / 1e6:.1f} MB; default splits {base_splits}",
        flush=True,
    )
    ref = call(base_splits, "f16").float()
    results = []
    for mode, np_, warps, stages in itertools.product(
        ("f16", "int8"), (1, 2, 4), (2, 4, 8), (2, 3, 4)
    ):
        gp = max(4, 16 // np_)
        hack_attn._launch_config = lambda *_a, c=(np_, gp, warps, stages): c
        for splits in (base_splits // 2, base_splits, base_splits * 2):
            if splits < 1:
                continue
            try:
                out = call(splits, mode).float()
                err = ((out - ref).norm() / ref.norm()).item()
                us = _time(lambda: call(splits, mode))
            except Exception as exc:  # a config that does not compile (resources) is skipped
                print(
                    f"{mode} np={np_} gp={gp} w={warps} st={stages} sp={splits}: "
                    f"{type(exc).__name__}: {str(exc)[:120]}",
                    flush=True,
                )
                continue
            results.append((us, mode, np_, gp, warps, stages, splits, err))
            print(
                f"{mode} np={np_} gp={gp} w={warps} st={stages} sp={splits}: {us:.1f} us "
                f"({sdpa / us:.2f}x SDPA, {stored / us / 1e6:.2f} TB/s, rel diff {err:.1e})",
                flush=True,
            )
    hack_attn._launch_config = default_cfg
    results.sort()
    print("\nbest 8:")
    for r in results[:8]:
        us, mode, np_, gp, warps, stages, splits, err = r
        print(
            f"  {mode} np={np_} gp={gp} warps={warps} stages={stages} splits={splits}: "
            f"{us:.1f} us = {sdpa / us:.2f}x SDPA, {stored / us / 1e6:.2f} TB/s"
        )


if __name__ == "__main__":
    main()
