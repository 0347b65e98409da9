"""`zipserve bench`: the benchmarks' options and which bench/ module each runs with what."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from zipserve.deploy.cli_values import (
    DECODE_KV_HELP,
    csv_codecs,
    csv_floats,
    csv_ints,
    csv_links,
    csv_modes,
    nonneg_int,
    positive_float,
    positive_int,
)
from zipserve.deploy.engine_options import parse_engine_options
from zipserve.deploy.shipped import LCKV_MODEL, PACKAGE_ROOT, REFERENCE_MODEL, default_model

ALL_CODECS = "bf16,fp8,kivi4,hack4,kivi2,hack2,hack2mix,lowrank,lowrank+hack4,lowrank+hack2"
JCT_CODECS = "bf16,fp8,kivi2,hack2,hack4,lowrank+hack2"


def cmd_bench_jct(args: argparse.Namespace) -> int:
    from zipserve.bench import jct_client, jct_sweep, workloads

    command = "python3 -m zipserve " + " ".join(args.argv)
    codecs = (args.codecs or JCT_CODECS).split(",")
    if args.sweep:
        model = args.model or default_model()
        opts = parse_engine_options(args.engine_option)
        results = PACKAGE_ROOT / "bench" / "results"
        quality = args.quality_csv or [
            str(p)
            for p in sorted([*results.glob("quality*.csv"), *results.glob("quality*/quality.csv")])
        ]
        cfg = jct_sweep.SweepConfig(
            model=model,
            codecs=tuple(codecs),
            links=tuple(args.links),
            rates=tuple(args.rates),
            workload=args.workload,
            num_requests=args.num_requests,
            seed=args.seed,
            scale=args.scale,
            max_seconds=args.max_seconds,
            device=args.device,
            engine_options=opts,
            restart_each=args.restart_each,
            decode_kv=tuple(csv_modes(args.decode_kv or "compressed")),
            num_prefill=args.prefill_workers,
            num_decode=args.decode_workers,
            local_prefill_tokens=args.local_prefill_tokens,
            quality_csvs=tuple(quality),
            command=command,
        )
        jct_sweep.run(cfg, Path(args.out))
        return 0
    if not args.url:
        raise ValueError("bench jct: give --url of a running deployment, or --sweep")
    if args.decode_kv is not None:
        raise ValueError(
            "--decode-kv: only with --sweep (a running deployment's lanes were set "
            "by `zipserve serve --decode-kv`)"
        )
    if args.rate is None and args.workload in workloads.SHAPES:
        raise ValueError(f"--rate: the {args.workload} workload needs an arrival rate")
    # A running deployment caches prefixes: a fresh salt per run (same lengths and arrivals,
    # other token ids) keeps a repeated run from being served from an earlier run's cache.
    salt = args.salt if args.salt is not None else f"run{time.time_ns()}"
    wl = workloads.build(
        args.workload,
        rate=args.rate,
        num_requests=args.num_requests,
        seed=args.seed,
        scale=args.scale,
        vocab=args.vocab,
        salt=salt,
    )
    print(f"prompt token ids: seed {args.seed}, salt {salt!r} (--salt {salt} replays them)")
    jct_client.run(
        args.url,
        wl,
        Path(args.out) / "jct_client.csv",
        allow_remote=args.allow_remote,
        max_seconds=args.max_seconds,
        api_key=args.api_key,
        codec=None if args.codecs is None else codecs[0],
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "jct":
        return cmd_bench_jct(args)
    if args.what == "cache-report":
        from zipserve.bench import cache_report

        if not args.results:
            raise ValueError("--results: name the multiturn sweep folder(s) to report")
        cache_report.write(
            [Path(d) for d in args.results],
            Path(args.page or PACKAGE_ROOT / "bench" / "JCT_RESULTS.md"),
        )
        return 0
    if args.what == "report":
        from zipserve.bench import jct_report

        dirs = [
            Path(d) for d in (args.results or [str(PACKAGE_ROOT / "bench" / "results" / "jct")])
        ]
        jct_report.write(
            dirs,
            Path(args.page or PACKAGE_ROOT / "bench" / "JCT_RESULTS.md"),
            readme=PACKAGE_ROOT / "README.md" if args.readme else None,
            quality_csvs=args.quality_csv or None,
        )
        return 0
    args.codecs = args.codecs or ALL_CODECS
    if args.what == "engine":
        from zipserve.bench import engine_bench

        engine_bench.run(
            args.model or "random:llama3-8b",
            args.batches or [1, 16, 64],
            args.contexts or [2048, 8192],
            Path(args.out),
            iters=args.iters,
            prefill_len=args.prefill_len,
            lanes=[c for c in (args.codecs or "bf16").split(",") if c],
        )
        return 0
    if args.what == "kernels":
        from zipserve.bench import kernel_bench

        codecs = [
            c
            for c in args.codecs.split(",")
            if c in ("fp8", "kivi2", "kivi4", "hack2", "hack4", "lowrank")
        ]
        # (lowrank+hack* decode has no kernel yet: compress/lowrank.py)
        kernel_bench.run(
            Path(args.out),
            codecs,
            args.batches or [1, 8, 32],
            args.contexts or [4096, 32768, 131072],
        )
        return 0
    if args.what == "disagg":
        from zipserve.bench import disagg_bench

        disagg_bench.run(
            args.model or "random:llama3-8b",
            args.codecs.split(","),
            args.prefill_len,
            args.gen_tokens,
            [None, args.link_gbps_bench],
            Path(args.out),
            device=args.device,
            kv_path=args.kv_path,
            decode_kv=csv_modes(args.decode_kv or "compressed"),
        )
        return 0
    if args.what == "transfer":
        from zipserve.bench import transfer_bench

        transfer_bench.run(
            Path(args.out),
            args.channels.split(",") if args.channels else None,
            int(args.max_mb * (1 << 20)),
            device=args.device,
        )
        return 0
    if args.what == "quality":
        from zipserve.bench import quality_bench

        quality_bench.run(
            args.model or default_model(),
            args.codecs.split(","),
            Path(args.out),
            text_dir=args.text_dir,
            gen_tokens=args.gen_tokens,
            device=args.device,
        )
        return 0
    if args.what == "lckv":
        from zipserve.bench import lckv_bench

        models = args.models.split(",") if args.models else [str(REFERENCE_MODEL), str(LCKV_MODEL)]
        lckv_bench.run(
            models,
            args.lckv_codecs.split(","),
            args.budget_gb,
            args.context,
            args.prefill_len,
            Path(args.out),
            iters=args.iters,
            device=args.device,
        )
        return 0
    if args.what == "load":
        from zipserve.bench import load_bench

        load_bench.run(
            args.model or default_model(),
            Path(args.out),
            args.clients,
            args.duration,
            codec=args.codecs.split(",")[0],
            device=args.device,
        )
        return 0
    raise SystemExit(f"unknown benchmark {args.what!r}")


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="benchmarks (GPU)")
    b.add_argument(
        "what",
        choices=[
            "engine",
            "kernels",
            "quality",
            "disagg",
            "lckv",
            "load",
            "jct",
            "report",
            "cache-report",
            "transfer",
        ],
    )
    b.add_argument(
        "--clients", type=positive_int, default=64, help="load: concurrent streaming clients"
    )
    b.add_argument("--duration", type=positive_float, default=60.0, help="load: seconds of load")
    b.add_argument(
        "--channels",
        default=None,
        help="transfer: host,inproc_device,checksum,cuda_ipc,nccl_self,nccl_pg,"
        "nccl_ctypes (default: all this machine can run)",
    )
    b.add_argument(
        "--decode-kv",
        default=None,
        metavar="MODES",
        help="disagg, jct --sweep: decode_kv modes to run each codec in, "
        "comma-separated (default: compressed; bf16 runs once); " + DECODE_KV_HELP,
    )
    b.add_argument(
        "--kv-path",
        choices=["auto", "host"],
        default="auto",
        help="disagg: 'host' forces KV through host memory (the old path)",
    )
    b.add_argument(
        "--max-mb",
        type=positive_float,
        default=256,
        help="transfer: largest message in MiB (sizes 4 KiB x 4^k)",
    )
    b.add_argument(
        "--link-gbps-bench",
        type=positive_float,
        default=10.0,
        help="disagg: the emulated link measured beside no link",
    )
    b.add_argument(
        "--model",
        default=None,
        help="default: random:llama3-8b (engine), the reference model (quality)",
    )
    b.add_argument(
        "--codecs",
        type=csv_codecs,
        default=None,
        help=f"default: {ALL_CODECS}; jct --sweep: {JCT_CODECS}; jct --url: the "
        f"deployment's (a codec given there is sent per request); engine: lanes, bf16 unless "
        f"given (hack2 = attention on codes, hack2/dense = decoded into the bf16 pool)",
    )
    b.add_argument("--text-dir", default=None)
    b.add_argument("--gen-tokens", type=positive_int, default=256)
    b.add_argument("--device", default=None)
    b.add_argument(
        "--batches", type=csv_ints, default=None, help="default: 1,16,64 (engine), 1,8,32 (kernels)"
    )
    b.add_argument(
        "--contexts",
        type=csv_ints,
        default=None,
        help="default: 2048,8192 (engine), 4096,32768,131072 (kernels)",
    )
    b.add_argument("--prefill-len", type=positive_int, default=8192)
    b.add_argument("--iters", type=positive_int, default=20)
    b.add_argument("--out", default="out/bench")
    b.add_argument(
        "--models",
        default=None,
        help="lckv: comma-separated, the first is the "
        "baseline (default: models/zipserve-ref,models/zipserve-lckv)",
    )
    b.add_argument(
        "--lckv-codecs", type=csv_codecs, default="bf16,hack2", help="lckv: codecs to stack on top"
    )
    b.add_argument(
        "--budget-gb", type=positive_float, default=8.0, help="lckv: KV memory budget (GiB)"
    )
    b.add_argument("--context", type=positive_int, default=2000, help="lckv: tokens per sequence")
    j = b.add_argument_group("jct (replay a workload over HTTP; --sweep starts the system)")
    j.add_argument("--url", default=None, help="jct: base URL of a running deployment")
    j.add_argument(
        "--allow-remote",
        action="store_true",
        help="jct: accept a --url that is not loopback or this machine",
    )
    j.add_argument("--api-key", default=None)
    j.add_argument(
        "--sweep",
        action="store_true",
        help="jct: start the system per codec and run every link x rate",
    )
    j.add_argument(
        "--workload",
        default="long-doc",
        help="long-doc, chat, shared-prefix (one long common prefix), multiturn (conversations "
        "of 4-8 dependent turns, each prompt the whole history; --sweep serves it without a "
        "tokenizer to get the answers' token ids back), or a JSONL trace (arrival_s, "
        "prompt_tokens, output_tokens)",
    )
    j.add_argument(
        "--rate",
        type=positive_float,
        default=None,
        help="jct --url: arrivals per second (multiturn: conversations per second)",
    )
    j.add_argument("--rates", type=csv_floats, default=[1.0], help="jct --sweep: e.g. 0.5,1,2")
    j.add_argument(
        "--links",
        type=csv_links,
        default=[None],
        help="jct --sweep: emulated link Gb/s, e.g. 10,25,100,none",
    )
    j.add_argument(
        "--num-requests",
        type=positive_int,
        default=32,
        help="jct: requests per run (multiturn: conversations)",
    )
    j.add_argument(
        "--scale",
        type=positive_float,
        default=1.0,
        help="jct: multiply token lengths (e.g. 0.02 on a CPU)",
    )
    j.add_argument("--seed", type=nonneg_int, default=0)
    j.add_argument(
        "--salt",
        default=None,
        help="jct --url: draw the prompts' token ids with this salt (same lengths and "
        "arrivals); default: a fresh one per run, so the deployment's prefix cache cannot "
        "serve a repeated run's prompts (give the printed salt to replay them)",
    )
    j.add_argument(
        "--max-seconds", type=positive_float, default=120.0, help="jct: bound of one run"
    )
    j.add_argument(
        "--vocab",
        type=positive_int,
        default=8000,
        help="jct --url: prompt token ids are drawn below min(vocab, 8000)",
    )
    j.add_argument(
        "--engine-option",
        action="append",
        default=[],
        help="jct --sweep: key=value EngineConfig option for the workers (repeat)",
    )
    j.add_argument(
        "--prefill-workers", type=positive_int, default=1, help="jct --sweep: prefill workers"
    )
    j.add_argument(
        "--decode-workers", type=positive_int, default=1, help="jct --sweep: decode workers"
    )
    j.add_argument(
        "--local-prefill-tokens",
        type=nonneg_int,
        default=None,
        help="jct --sweep: the deployment's --local-prefill-tokens (default: serve's)",
    )
    j.add_argument(
        "--restart-each",
        action="store_true",
        help="jct --sweep: a fresh system for every run (default: one per codec)",
    )
    j.add_argument(
        "--quality-csv",
        action="append",
        default=[],
        help="jct --sweep: bench quality CSV(s) (default: bench/results/quality*.csv "
        "and bench/results/quality*/quality.csv); report: instead of those each sweep recorded",
    )
    j.add_argument(
        "--results",
        action="append",
        default=[],
        help="report: sweep output folder(s) (default: bench/results/jct); cache-report: "
        "multiturn sweep folders (caching on and off)",
    )
    j.add_argument("--page", default=None, help="report: default bench/JCT_RESULTS.md")
    j.add_argument(
        "--readme", action="store_true", help="report: also refill the JCT block of README.md"
    )
    b.set_defaults(func=cmd_bench)
