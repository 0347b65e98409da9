"""The `zipserve` command: one subcommand per job, each a thin wrapper over library code."""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_MODEL = PACKAGE_ROOT / "models" / "zipserve-ref"


def default_model() -> str:
    """The shipped reference checkpoint; random:tiny where it is absent (a bare install)."""
    return str(REFERENCE_MODEL) if (REFERENCE_MODEL / "config.json").exists() else "random:tiny"


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def cmd_generate(args: argparse.Namespace) -> int:
    from zipserve.engine.llm import LLM, SamplingParams

    llm = LLM(args.model or default_model(), dtype=args.dtype, device=args.device)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    t0 = time.perf_counter()
    outs = llm.generate(args.prompt, params)
    dt = time.perf_counter() - t0
    for prompt, out in zip(args.prompt, outs):
        print(f"--- prompt: {prompt!r}")
        print(f"{prompt}{out.text}")
        print(f"--- {len(out.token_ids)} tokens, finish_reason={out.finish_reason}")
    n = sum(len(o.token_ids) for o in outs)
    print(f"{n} tokens in {dt:.2f} s on {llm.engine.device} ({n / dt:.1f} tokens/s); "
          f"KV pages free: {llm.engine.pool.num_free}/{llm.engine.pool.capacity}")
    return 0


def eval_ppl(model: str, text_dir: str | None, context: int, stride: int, dtype: str,
             device: str | None) -> dict:
    from zipserve.engine.llm import LLM
    from zipserve.engine.perplexity import perplexity
    from zipserve.train.corpus import load_corpus

    llm = LLM(model, dtype=dtype, device=device, max_model_len=context + 1)
    corpus = load_corpus(text_dir)
    docs = [llm.tokenizer.encode(d.text) for d in corpus.held_out]
    res = perplexity(llm.logits, docs, context=context, stride=stride)
    return {"perplexity": res.perplexity, "tokens": res.tokens, "context": context,
            "stride": stride, "dtype": str(llm.engine.dtype).replace("torch.", ""),
            "device": str(llm.engine.device), "held_out_digest": corpus.digest(),
            "corpus_root": str(corpus.root)}


def cmd_eval(args: argparse.Namespace) -> int:
    r = eval_ppl(args.model, args.text_dir, args.context, args.stride, args.dtype, args.device)
    print(f"held-out perplexity {r['perplexity']:.3f} over {r['tokens']:,} tokens "
          f"(context {r['context']}, stride {r['stride']}, {r['dtype']} on {r['device']}; "
          f"corpus {r['corpus_root']}, held-out digest {r['held_out_digest']})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from zipserve.train.model_card import write_model_card
    from zipserve.train.recipe import TrainConfig, train

    cfg = TrainConfig(total_tokens=args.tokens, seed=args.seed, compile=args.compile,
                      batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      num_layers=args.layers, hidden_size=args.hidden,
                      num_heads=args.hidden // 64, intermediate_size=args.hidden * 3,
                      vocab_size=args.vocab)
    summary = train(cfg, args.out, text_dir=args.text_dir, resume=args.resume,
                    device=args.device)
    summary["command"] = "zipserve " + " ".join(args.argv)
    print(f"trained in {summary['train_seconds']:.0f} s; measuring held-out perplexity")
    ppl = eval_ppl(args.out, args.text_dir, min(cfg.seq_len, 1024), min(cfg.seq_len, 1024) // 2,
                   "float32", args.device)
    write_model_card(Path(args.out), summary, ppl, Path(args.out).name)
    print(f"held-out perplexity {ppl['perplexity']:.3f}; model card at {args.out}/README.md")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from zipserve.compress.calibrate import calibrate
    from zipserve.engine.llm import LLM
    from zipserve.train.corpus import load_corpus

    model = args.model or default_model()
    if model.startswith("random:"):
        raise ValueError("model: calibrate needs a checkpoint directory to write the bases into")
    llm = LLM(model, dtype="float32", device=args.device, max_model_len=args.window + 1)
    corpus = load_corpus(args.text_dir)
    texts = [d.text for d in corpus.train]
    random.Random(0).shuffle(texts)  # a fixed sample across the whole training split
    info = calibrate(llm, texts, args.budget, args.out or model,
                     window=args.window, max_tokens=args.tokens)
    print(f"calibrated on {info['tokens']:,} tokens; K ranks {info['k_ranks']}, V ranks "
          f"{info['v_ranks']} of {info['head_dim']}; wrote {args.out or model}/lowrank.safetensors")
    return 0


def _serve_config(args: argparse.Namespace, codec: str):
    from zipserve.deploy.ray_backend import ServeConfig

    return ServeConfig(model=args.model or default_model(), codec=codec,
                       num_prefill=args.prefill, num_decode=args.decode, device=args.device,
                       link_gbps=args.link_gbps, prefill_group=args.prefill_group,
                       prefill_group_min_tokens=args.prefill_group_min_tokens)


def cmd_serve(args: argparse.Namespace) -> int:
    from zipserve.deploy.serve import serve

    key = args.api_key
    if args.api_key_file:
        key = Path(args.api_key_file).read_text().strip()
    serve(_serve_config(args, args.codec), args.host, args.port, args.address, key)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from zipserve.deploy.serve import demo

    demo(args.model or default_model(), args.codecs.split(","), args.max_tokens, args.port)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "engine":
        from zipserve.bench import engine_bench

        engine_bench.run(args.model or "random:llama3-8b", args.batches or [1, 16, 64],
                         args.contexts or [2048, 8192], Path(args.out),
                         iters=args.iters, prefill_len=args.prefill_len)
        return 0
    if args.what == "kernels":
        from zipserve.bench import kernel_bench

        codecs = [c for c in args.codecs.split(",") if c in ("fp8", "kivi2", "kivi4", "hack2",
                                                              "hack4")]  # kernels exist
        kernel_bench.run(Path(args.out), codecs, args.batches or [1, 8, 32],
                         args.contexts or [4096, 32768, 131072])
        return 0
    if args.what == "disagg":
        from zipserve.bench import disagg_bench

        disagg_bench.run(args.model or "random:llama3-8b", args.codecs.split(","),
                         args.prefill_len, args.gen_tokens, [None, args.link_gbps_bench],
                         Path(args.out), device=args.device)
        return 0
    if args.what == "quality":
        from zipserve.bench import quality_bench

        quality_bench.run(args.model or default_model(), args.codecs.split(","), Path(args.out),
                          text_dir=args.text_dir, gen_tokens=args.gen_tokens,
                          device=args.device)
        return 0
    raise SystemExit(f"unknown benchmark {args.what!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zipserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text offline from one or more prompts")
    g.add_argument("--model", default=None, help="default: the shipped reference model")
    g.add_argument("--prompt", action="append", required=True, help="repeat for several")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default="auto")
    g.add_argument("--device", default=None)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="train the reference model from scratch (GPU: ~5 min)")
    t.add_argument("--out", default=str(REFERENCE_MODEL))
    t.add_argument("--text-dir", default=None, help="default: this Python's standard library")
    t.add_argument("--tokens", type=int, default=100_000_000, help="training token budget")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--seq-len", type=int, default=1024)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--layers", type=int, default=6)
    t.add_argument("--hidden", type=int, default=256, help="hidden size (head_dim is 64)")
    t.add_argument("--vocab", type=int, default=8192)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    t.add_argument("--device", default=None)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("calibrate", help="low-rank K/V bases for the lowrank codecs")
    c.add_argument("--model", default=None, help="default: the shipped reference model")
    c.add_argument("--text-dir", default=None, help="default: this Python's standard library "
                   "(training split only)")
    c.add_argument("--budget", type=float, default=0.5,
                   help="average fraction of K+V dimensions kept (0.5 = half the bytes)")
    c.add_argument("--tokens", type=int, default=200_000, help="calibration tokens")
    c.add_argument("--window", type=int, default=1024)
    c.add_argument("--out", default=None, help="default: beside the checkpoint")
    c.add_argument("--device", default=None)
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("eval", help="evaluate a model")
    e.add_argument("what", choices=["ppl"])
    e.add_argument("--model", default=None, help="default: the shipped reference model")
    e.add_argument("--text-dir", default=None, help="default: this Python's standard library")
    e.add_argument("--context", type=int, default=1024)
    e.add_argument("--stride", type=int, default=512)
    e.add_argument("--dtype", default="float32")
    e.add_argument("--device", default=None)
    e.set_defaults(func=lambda a: cmd_eval(argparse.Namespace(**{**vars(a),
                                                                 "model": a.model or default_model()})))

    s = sub.add_parser("serve", help="router + prefill/decode workers on Ray")
    s.add_argument("--model", default=None, help="default: the shipped reference model")
    s.add_argument("--codec", default="hack4")
    s.add_argument("--prefill", type=int, default=1, help="prefill workers")
    s.add_argument("--decode", type=int, default=1, help="decode workers")
    s.add_argument("--address", default=None,
                   help="an existing Ray cluster ('auto' or host:port); default: embedded Ray")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None)
    s.add_argument("--api-key-file", default=None)
    s.add_argument("--link-gbps", type=float, default=None, help="emulate a link of this speed")
    s.add_argument("--device", default=None)
    s.add_argument("--prefill-group", type=int, default=0, metavar="N",
                   help="a sequence-parallel prefill group of N workers for long prompts (0: off)")
    s.add_argument("--prefill-group-min-tokens", type=int, default=16384, metavar="M",
                   help="prompts of at least M tokens go to the prefill group")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="start the system, send real requests, print a JCT table")
    d.add_argument("--model", default=None, help="default: the shipped reference model")
    d.add_argument("--codecs", default="bf16,hack4,hack2")
    d.add_argument("--max-tokens", type=int, default=48)
    d.add_argument("--port", type=int, default=8765)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks (GPU)")
    b.add_argument("what", choices=["engine", "kernels", "quality", "disagg"])
    b.add_argument("--link-gbps-bench", type=float, default=10.0,
                   help="disagg: the emulated link measured beside no link")
    b.add_argument("--model", default=None,
                   help="default: random:llama3-8b (engine), the reference model (quality)")
    b.add_argument("--codecs", default="bf16,fp8,kivi4,hack4,kivi2,hack2,lowrank,lowrank+hack4,lowrank+hack2")
    b.add_argument("--text-dir", default=None)
    b.add_argument("--gen-tokens", type=int, default=256)
    b.add_argument("--device", default=None)
    b.add_argument("--batches", type=_csv_ints, default=None,
                   help="default: 1,16,64 (engine), 1,8,32 (kernels)")
    b.add_argument("--contexts", type=_csv_ints, default=None,
                   help="default: 2048,8192 (engine), 4096,32768,131072 (kernels)")
    b.add_argument("--prefill-len", type=int, default=8192)
    b.add_argument("--iters", type=int, default=20)
    b.add_argument("--out", default="out/bench")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except ValueError as e:  # bad input: say what, no traceback
        print(f"zipserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
