"""The `zipserve` command: one subcommand per job, each a thin wrapper over library code."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "random:tiny"


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def cmd_generate(args: argparse.Namespace) -> int:
    from zipserve.engine.llm import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device)
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


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "engine":
        from zipserve.bench import engine_bench

        engine_bench.run(args.model, args.batches, args.contexts, Path(args.out),
                         iters=args.iters, prefill_len=args.prefill_len)
        return 0
    raise SystemExit(f"unknown benchmark {args.what!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zipserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text offline from one or more prompts")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--prompt", action="append", required=True, help="repeat for several")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default="auto")
    g.add_argument("--device", default=None)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="benchmarks (GPU)")
    b.add_argument("what", choices=["engine"])
    b.add_argument("--model", default="random:llama3-8b")
    b.add_argument("--batches", type=_csv_ints, default=[1, 16, 64])
    b.add_argument("--contexts", type=_csv_ints, default=[2048, 8192])
    b.add_argument("--prefill-len", type=int, default=8192)
    b.add_argument("--iters", type=int, default=20)
    b.add_argument("--out", default="out/bench")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad input: say what, no traceback
        print(f"zipserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
