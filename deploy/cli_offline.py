"""`zipserve generate`, `train`, `calibrate` and `eval`: the offline subcommands, their options
and what each calls (engine/llm.py, train/)."""

from __future__ import annotations

import argparse
import time

from zipserve.deploy.cli_values import (
    Bounded,
    fraction,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
)
from zipserve.deploy.shipped import REFERENCE_MODEL, default_model


def cmd_generate(args: argparse.Namespace) -> int:
    from zipserve.engine.llm import LLM, SamplingParams

    llm = LLM(args.model or default_model(), dtype=args.dtype, device=args.device)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    outs = llm.generate(args.prompt, params)
    dt = time.perf_counter() - t0
    for prompt, out in zip(args.prompt, outs):
        print(f"--- prompt: {prompt!r}")
        print(f"{prompt}{out.text}")
        print(
            f"--- {len(out.token_ids)} tokens, finish_reason={out.finish_reason}, "
            f"{out.cached_tokens} prompt tokens from the prefix cache"
        )
    n = sum(len(o.token_ids) for o in outs)
    print(
        f"{n} tokens in {dt:.2f} s on {llm.engine.device} ({n / dt:.1f} tokens/s); "
        f"KV pages free: {llm.engine.pool.num_free}/{llm.engine.pool.capacity}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from zipserve.train.evaluate import eval_ppl, lckv_passes

    with lckv_passes(args.model or default_model(), args.lckv_passes) as model:
        r = eval_ppl(model, args.text_dir, args.context, args.stride, args.dtype, args.device)
    if args.lckv_passes:
        print(f"LCKV prompt encoding: {args.lckv_passes} passes")
    print(
        f"held-out perplexity {r['perplexity']:.3f} over {r['tokens']:,} tokens "
        f"(context {r['context']}, stride {r['stride']}, {r['dtype']} on {r['device']}; "
        f"corpus {r['corpus_root']}, held-out digest {r['held_out_digest']})"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from zipserve.train.model_card import measure_and_write_card
    from zipserve.train.recipe import TrainConfig, train

    cfg = TrainConfig(
        total_tokens=args.tokens,
        seed=args.seed,
        compile=args.compile,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_heads=args.hidden // 64,
        intermediate_size=args.hidden * 3,
        vocab_size=args.vocab,
        arch=args.arch,
        lckv_warmup=args.lckv_warmup,
        lckv_passes_no_grad=args.lckv_m,
        lckv_passes_grad=args.lckv_b,
    )
    summary = train(
        cfg,
        args.out,
        text_dir=args.text_dir,
        resume=args.resume,
        device=args.device,
        tokenizer_from=args.tokenizer_from,
    )
    summary["command"] = "zipserve " + " ".join(args.argv)
    print(f"trained in {summary['train_seconds']:.0f} s; measuring held-out perplexity")
    ppl = measure_and_write_card(args.out, summary, cfg.seq_len, args.text_dir, args.device)
    print(f"held-out perplexity {ppl['perplexity']:.3f}; model card at {args.out}/README.md")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from zipserve.train.calibration import (
        calibrate_layer_bits,
        calibrate_lowrank,
        calibrate_lowrank_hack,
    )

    model = args.model or default_model()
    if args.kvbits:  # the per-layer bits of hack2mix (compress/kvbits.py)
        info = calibrate_layer_bits(
            model,
            args.text_dir,
            0.25 if args.budget is None else args.budget,
            args.out,
            args.window,
            args.kvbits_windows,
            args.min_gain,
        )
        print(
            f"hack2mix: 4 bits in layers {info['layers_4bit']}; {info['bytes_per_token']:.0f} "
            f"B/token = {100 * info['ratio_vs_bf16']:.1f}% of bf16; wrote "
            f"{args.out or model}/kvbits.json"
        )
        return 0
    if args.lowrank_hack:  # lowrank+hack2mix's per-layer widths and bits (compress/lowrank_plan.py)
        info = calibrate_lowrank_hack(
            model,
            args.text_dir,
            0.15 if args.budget is None else args.budget,
            args.out,
            args.window,
            args.measure_windows,
        )
        print(
            f"lowrank+hack2mix: widths {info['widths']}, bits {info['bits']}; "
            f"{info['bytes_per_token']:.0f} B/token = {100 * info['ratio_vs_bf16']:.1f}% of bf16; "
            f"wrote {args.out or model}/lowrank_hack.json"
        )
        return 0
    info = calibrate_lowrank(
        model,
        args.text_dir,
        0.5 if args.budget is None else args.budget,
        args.out,
        args.window,
        args.tokens,
        args.device,
        allocation=args.allocation,
        measure_windows=args.measure_windows,
        rank_step=args.rank_step,
    )
    print(
        f"calibrated on {info['tokens']:,} tokens; K ranks {info['k_ranks']}, V ranks "
        f"{info['v_ranks']} of {info['head_dim']} ({info['allocation']}); wrote "
        f"{args.out or model}/lowrank.safetensors"
    )
    return 0


def add_offline_commands(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text offline from one or more prompts")
    g.add_argument("--model", default=None, help="default: the shipped reference model")
    g.add_argument("--prompt", action="append", required=True, help="repeat for several")
    g.add_argument("--max-tokens", type=positive_int, default=32)
    g.add_argument("--temperature", type=nonneg_float, default=0.0)
    g.add_argument("--top-p", type=fraction, default=1.0)
    g.add_argument("--top-k", type=Bounded(int, -1), default=0, help="0 or -1: off")
    g.add_argument("--seed", type=nonneg_int, default=None)
    g.add_argument("--dtype", default="auto")
    g.add_argument("--device", default=None)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="train the reference model from scratch (GPU: ~5 min)")
    t.add_argument("--out", default=str(REFERENCE_MODEL))
    t.add_argument("--text-dir", default=None, help="default: this Python's standard library")
    t.add_argument("--tokens", type=positive_int, default=100_000_000, help="training token budget")
    t.add_argument("--batch-size", type=positive_int, default=32)
    t.add_argument("--seq-len", type=positive_int, default=1024)
    t.add_argument("--lr", type=positive_float, default=2e-3)
    t.add_argument("--layers", type=positive_int, default=6)
    t.add_argument("--hidden", type=positive_int, default=256, help="hidden size (head_dim is 64)")
    t.add_argument("--vocab", type=positive_int, default=8192)
    t.add_argument("--seed", type=nonneg_int, default=0)
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    t.add_argument(
        "--arch",
        choices=["llama", "lckv"],
        default="llama",
        help="lckv: layer-condensed KV variant (engine/lckv_model.py)",
    )
    t.add_argument(
        "--lckv-warmup",
        type=nonneg_int,
        default=2,
        help="lckv: warmup layers keeping their own KV (split bottom/top)",
    )
    t.add_argument("--lckv-m", type=nonneg_int, default=7, help="lckv: passes without gradient")
    t.add_argument("--lckv-b", type=positive_int, default=2, help="lckv: passes with gradient")
    t.add_argument(
        "--tokenizer-from",
        default=None,
        help="reuse this model directory's tokenizer instead of training one",
    )
    t.add_argument("--device", default=None)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser(
        "calibrate",
        help="low-rank K/V bases and ranks for the lowrank codecs; with --lowrank-hack the "
        "per-layer widths and bits of lowrank+hack2mix; with --kvbits the per-layer bits of "
        "hack2mix",
    )
    c.add_argument("--model", default=None, help="default: the shipped reference model")
    c.add_argument(
        "--text-dir",
        default=None,
        help="default: this Python's standard library (training split only)",
    )
    c.add_argument(
        "--budget",
        type=fraction,
        default=None,
        help="lowrank: average fraction of K+V dimensions kept (default 0.5 = half the "
        "bytes); --lowrank-hack / --kvbits: bytes per token as a fraction of bf16's (default "
        "0.15 / 0.25)",
    )
    c.add_argument(
        "--allocation",
        choices=["measured", "energy"],
        default="measured",
        help="lowrank ranks: from the perplexity each rank costs on --measure-windows "
        "training windows (default), or by retained energy",
    )
    c.add_argument(
        "--rank-step",
        type=positive_int,
        default=8,
        help="lowrank ranks are multiples of this (must divide head_dim)",
    )
    c.add_argument(
        "--measure-windows",
        type=positive_int,
        default=8,
        help="lowrank / --lowrank-hack: training windows of --window tokens the choices are "
        "measured on (last half scored)",
    )
    c.add_argument(
        "--lowrank-hack",
        action="store_true",
        help="instead of bases: measure each layer's loss in HACK of each width and bits on "
        "the calibrated bases and write lowrank_hack.json, the plan of lowrank+hack2mix",
    )
    c.add_argument(
        "--kvbits",
        action="store_true",
        help="instead of lowrank bases: measure each layer's sensitivity to 2-bit HACK "
        "on the training split and write kvbits.json, the per-layer bits of hack2mix",
    )
    c.add_argument(
        "--kvbits-windows",
        type=positive_int,
        default=4,
        help="--kvbits: calibration windows of --window tokens (last half scored)",
    )
    c.add_argument(
        "--min-gain",
        type=nonneg_float,
        default=0.005,
        help="--kvbits: least predicted perplexity decrease worth a 4-bit layer",
    )
    c.add_argument("--tokens", type=positive_int, default=200_000, help="calibration tokens")
    c.add_argument("--window", type=positive_int, default=1024)
    c.add_argument("--out", default=None, help="default: beside the checkpoint")
    c.add_argument("--device", default=None)
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("eval", help="evaluate a model")
    e.add_argument("what", choices=["ppl"])
    e.add_argument("--model", default=None, help="default: the shipped reference model")
    e.add_argument("--text-dir", default=None, help="default: this Python's standard library")
    e.add_argument("--context", type=positive_int, default=1024)
    e.add_argument("--stride", type=positive_int, default=512)
    e.add_argument("--dtype", default="float32")
    e.add_argument("--device", default=None)
    e.add_argument(
        "--lckv-passes",
        type=positive_int,
        default=None,
        help="LCKV models: encode prompts with this many passes (config: m + b)",
    )
    e.set_defaults(func=cmd_eval)
