"""lowrank+hack2's page attention (the Triton HACK kernel at width 64, 2 bits) under other launch
configurations, timed side by side on a GPU, to choose its heuristic from measurements.

At 8 x 8k its kernel took about as long as bf16's whole paged attention (session 18, H100:
3.0 ms of a step in 32 layers) for a quarter of the bytes; offline, its 2-warp programs sit at 255
registers with 88 bytes of stack (bench/kernel_resources.py), so an SM holds 4 of them. This
times `hack_decode_attention` on the projected queries of a random:llama3-8b lowrank+hack2 layer
(pages encoded from random K / V) for each (pages per step NP, padded group GP, warps, stages) x
page splits, each against the default configuration's output (relative error), beside bf16's
paged attention over the same number of tokens, and the whole lowrank+hack2 decode attention
(pages + tail merge) at its defaults. CUDA-graph replay timing (bench/kernel_bench.py's _time).
Run from the repository root with the package importable: `python3 bench/diag/hack64_configs.py`.
"""

import itertools

import torch

from zipserve.bench.kernel_bench import _time
from zipserve.compress.codecs import make_codec
from zipserve.kernels import hack_decode_attention as hd
from zipserve.kernels.paged_decode_attention import choose_num_splits, paged_decode_attention

B, H, KVH, D, P, CONTEXT = 8, 32, 8, 128, 64, 8192


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    gen = torch.Generator(device=dev).manual_seed(0)
    codec = make_codec("lowrank+hack2", KVH, P, D, model_dir="random:llama3-8b").for_layer(0)
    n_full = CONTEXT // P
    n_pages = B * n_full
    store = codec.new_store(n_pages, dev)
    for i in range(0, n_pages, 128):  # encode in chunks: fp32 K / V of 128 pages at a time
        n = min(128, n_pages - i)
        k = torch.randn(n, KVH, P, D, device=dev, generator=gen)
        codec.encode(store, torch.arange(i, i + n, device=dev), k, torch.randn_like(k))
    page_table = torch.arange(n_pages, device=dev, dtype=torch.int32).view(B, n_full)
    full = torch.full((B,), n_full, device=dev, dtype=torch.int32)
    q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16, generator=gen)
    w = codec.width
    q_red = codec._page_query(q)[0].contiguous()  # [B, H, W] fp32, as the codec's decode makes it
    no_tail = q_red.new_zeros(B, KVH, 1, w)
    zero_lens = torch.zeros(B, dtype=torch.int32, device=dev)
    pages = codec.inner._pages(store)
    scale = D**-0.5

    def pages_call(splits):
        return lambda: hd.hack_decode_attention(
            q_red,
            pages,
            page_table,
            full,
            no_tail,
            no_tail,
            zero_lens,
            scale,
            2,
            n_sink=codec.n_sink,
            num_splits=splits,
            backend="triton",
            return_lse=True,
        )

    default_cfg = hd._launch_config(H // KVH, P, w, 2)
    default_splits = hd.hack_num_splits(B, KVH, CONTEXT, sms, "triton", 2, w)
    want, _ = pages_call(default_splits)()
    print(f"{torch.cuda.get_device_name()}, {sms} SMs; lowrank+hack2 width {w}, B {B} x {CONTEXT}")
    print(f"default: (NP, GP, warps, stages) {default_cfg}, splits {default_splits}\n")
    print("| NP | GP | warps | stages | splits | us | rel err vs default |")
    print("|---|---|---|---|---|---|---|")
    real = hd._launch_config
    configs = [default_cfg] + [
        (np_, 16 // np_, warps, stages)
        for np_, warps, stages in itertools.product((1, 2, 4), (1, 2, 4), (2, 3))
        if (np_, 16 // np_, warps, stages) != default_cfg
    ]  # M = NP * GP = 16 rows of the MMA tile, GP >= the group of 4
    try:
        for cfg in configs:
            hd._launch_config = lambda *a, cfg=cfg: cfg
            for splits in sorted({default_splits, 16, 32}):
                try:
                    got, _ = pages_call(splits)()
                    us = _time(pages_call(splits))
                    err = _rel(got, want)
                    print(
                        f"| {' | '.join(map(str, cfg))} | {splits} | {us:.1f} | {err:.1e} |",
                        flush=True,
                    )
                except Exception as e:  # a configuration that does not compile or fit
                    print(
                        f"| {' | '.join(map(str, cfg))} | {splits} | failed: "
                        f"{type(e).__name__}: {str(e)[:80]} | |",
                        flush=True,
                    )
    finally:
        hd._launch_config = real

    # the same tokens as bf16 pages through the paged kernel, and the whole lowrank+hack2 call
    kc = torch.randn(n_pages, KVH, P, D, device=dev, dtype=torch.bfloat16, generator=gen)
    vc = torch.randn_like(kc)
    seq_lens = torch.full((B,), CONTEXT, device=dev, dtype=torch.int32)
    s = choose_num_splits(B, KVH, CONTEXT, sms)
    bf16_us = _time(lambda: paged_decode_attention(q, kc, vc, page_table, seq_lens, scale, s))
    tail = torch.zeros(B, KVH, codec.n_sink + P + 1, D, device=dev, dtype=torch.bfloat16)
    lens = torch.full((B,), 33, device=dev, dtype=torch.int32)
    whole_us = _time(
        lambda: codec.decode_attention(
            q,
            store,
            page_table,
            full,
            tail,
            tail,
            lens,
            scale,
            default_splits,
            dense_rows=torch.arange(B, device=dev, dtype=torch.int32),
            dense_start=torch.zeros(B, device=dev, dtype=torch.int32),
        )
    )
    print(
        f"\nbf16 paged attention (splits {s}): {bf16_us:.1f} us; lowrank+hack2 decode "
        f"attention at its defaults (pages + tail merge, 33 tail tokens): {whole_us:.1f} us"
    )


if __name__ == "__main__":
    main()
