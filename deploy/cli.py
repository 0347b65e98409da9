"""The `zipserve` command: one subcommand per job, each a thin wrapper over library code."""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
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


@contextlib.contextmanager
def lckv_passes(model: str, passes: int | None):
    """`model` as is, or (passes given) a temporary copy of its directory, files linked, whose
    LCKV prompt encoding runs `passes` passes over the condensed stack: to measure convergence."""
    if passes is None:
        yield model
        return
    src = Path(model)
    cfg = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    if "lckv" not in cfg:
        raise ValueError(f"lckv-passes: {model} is not an LCKV model directory")
    if passes < 1:
        raise ValueError(f"lckv-passes: must be >= 1, got {passes}")
    cfg["lckv"].update(passes_no_grad=passes - 1, passes_grad=1)
    with tempfile.TemporaryDirectory() as tmp:
        for f in src.iterdir():
            if f.name != "config.json":
                (Path(tmp) / f.name).symlink_to(f.resolve())
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        yield tmp


def cmd_eval(args: argparse.Namespace) -> int:
    with lckv_passes(args.model, args.lckv_passes) as model:
        r = eval_ppl(model, args.text_dir, args.context, args.stride, args.dtype, args.device)
    if args.lckv_passes:
        print(f"LCKV prompt encoding: {args.lckv_passes} passes")
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
                      vocab_size=args.vocab, arch=args.arch, lckv_warmup=args.lckv_warmup,
                      lckv_passes_no_grad=args.lckv_m, lckv_passes_grad=args.lckv_b)
    summary = train(cfg, args.out, text_dir=args.text_dir, resume=args.resume,
                    device=args.device, tokenizer_from=args.tokenizer_from)
    summary["command"] = "zipserve " + " ".join(args.argv)
    print(f"trained in {summary['train_seconds']:.0f} s; measuring held-out perplexity")
    ppl = eval_ppl(args.out, args.text_dir, min(cfg.seq_len, 1024), min(cfg.seq_len, 1024) // 2,
                   "float32", args.device)
    write_model_card(Path(args.out), summary, ppl, Path(args.out).name)
    print(f"held-out perplexity {ppl['perplexity']:.3f}; model card at {args.out}/README.md")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.kvbits:
        return _calibrate_kvbits(args)
    from zipserve.compress.calibrate import calibrate
    from zipserve.engine.llm import LLM
    from zipserve.train.corpus import load_corpus

    model = args.model or default_model()
    if model.startswith("random:"):
        raise ValueError("model: calibrate needs a checkpoint directory to write the bases into")
    llm = LLM(model, dtype="float32", device=args.device, max_model_len=args.window + 1)
    if llm.engine.config.lckv is not None:
        raise ValueError("model: calibrate does not support LCKV models yet (lowrank codecs "
                         "need bases per KV layer)")
    corpus = load_corpus(args.text_dir)
    texts = [d.text for d in corpus.train]
    random.Random(0).shuffle(texts)  # a fixed sample across the whole training split
    info = calibrate(llm, texts, 0.5 if args.budget is None else args.budget, args.out or model,
                     window=args.window, max_tokens=args.tokens)
    print(f"calibrated on {info['tokens']:,} tokens; K ranks {info['k_ranks']}, V ranks "
          f"{info['v_ranks']} of {info['head_dim']}; wrote {args.out or model}/lowrank.safetensors")
    return 0


def _calibrate_kvbits(args: argparse.Namespace) -> int:
    """`calibrate --kvbits`: the per-layer bits of hack2mix (compress/kvbits.py)."""
    from zipserve.compress.kvbits import calibrate_kvbits

    model = args.model or default_model()
    if model.startswith("random:"):
        raise ValueError("model: calibrate needs a checkpoint directory to write kvbits.json into")
    from zipserve.engine.loading import model_config_for

    if model_config_for(model).lckv is not None:
        raise ValueError("model: calibrate --kvbits does not support LCKV models yet (a plan "
                         "needs bits per KV layer)")
    budget = 0.25 if args.budget is None else args.budget
    info = calibrate_kvbits(model, args.out, args.text_dir, n_windows=args.kvbits_windows,
                            context=args.window, budget=budget, min_gain=args.min_gain)
    print(f"hack2mix: 4 bits in layers {info['layers_4bit']}; {info['bytes_per_token']:.0f} "
          f"B/token = {100 * info['ratio_vs_bf16']:.1f}% of bf16; wrote "
          f"{args.out or model}/kvbits.json")
    return 0


def _serve_config(args: argparse.Namespace, codec: str):
    """codec: one codec, or several separated by commas (the first is the default)."""
    from zipserve.control.config import ServeConfig

    first, *extra = [c.strip() for c in codec.split(",")]
    return ServeConfig(model=args.model or default_model(), codec=first, extra_codecs=tuple(extra),
                       num_prefill=args.prefill, num_decode=args.decode, device=args.device,
                       link_gbps=args.link_gbps, transfer_deadline_s=args.transfer_deadline,
                       max_restarts=args.max_restarts, retries=args.retries,
                       page_wait_s=args.page_wait, prefill_resource=args.prefill_resource,
                       decode_resource=args.decode_resource, prefill_group=args.prefill_group,
                       prefill_group_min_tokens=args.prefill_group_min_tokens,
                       prefill_group_exchange=args.prefill_group_exchange,
                       served_model_name=args.served_model_name,
                       engine_options=_engine_options(args.engine_option),
                       decode_kv=args.decode_kv,
                       skip_tokenizer=getattr(args, "skip_tokenizer", False))


def _admission_config(args: argparse.Namespace):
    from zipserve.router.limits import AdmissionConfig

    return AdmissionConfig(max_queued_tokens=args.max_queued_tokens,
                           max_queued_jobs=args.max_queued_requests,
                           max_prompt_tokens=args.max_prompt_tokens,
                           request_timeout_s=args.request_timeout,
                           max_body_bytes=args.max_body_bytes,
                           header_timeout_s=args.header_timeout,
                           body_timeout_s=args.body_timeout)


def read_api_key(key: str | None, key_file: str | None) -> str | None:
    """--api-key or the first line of --api-key-file (not both); an empty key is an error."""
    if key is not None and key_file is not None:
        raise ValueError("--api-key and --api-key-file: give one, not both")
    if key_file is not None:
        try:
            key = Path(key_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"--api-key-file: cannot read {key_file}: {e.strerror}") from None
    if key is not None and not key.strip():
        raise ValueError("--api-key: the key is empty")
    return key


def cmd_serve(args: argparse.Namespace) -> int:
    from zipserve.deploy.serve import serve

    key = read_api_key(args.api_key, args.api_key_file)
    limits = _admission_config(args)
    serve(_serve_config(args, args.codec), args.host, args.port, args.address, key, limits)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from zipserve.deploy.demo import demo, scaled_link_gbps

    model = args.model or default_model()
    link = args.link_gbps
    if link is None:  # the link that stands for 10 Gb/s with Llama-3-8B
        link = scaled_link_gbps(model)
    demo(model, args.codecs.split(","), args.max_tokens, args.port, link or None,
         decode_kv=_csv_modes(args.decode_kv))
    return 0


ALL_CODECS = ("bf16,fp8,kivi4,hack4,kivi2,hack2,hack2mix,lowrank,lowrank+hack4,"
              "lowrank+hack2")
JCT_CODECS = "bf16,fp8,kivi2,hack2,hack4,lowrank+hack2"


def _csv_links(text: str) -> list[float | None]:
    """"10,25,100,none" -> [10.0, 25.0, 100.0, None]."""
    try:
        return [None if x.strip().lower() in ("none", "unlimited", "inf") else float(x)
                for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Gb/s numbers or 'none', got {text!r}") \
            from None


def _csv_floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None


def _csv_modes(text: str) -> list[str]:
    """"compressed,dense" -> ["compressed", "dense"], each a decode_kv mode."""
    from zipserve.engine.decode_kv import DECODE_KV_MODES

    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in DECODE_KV_MODES]
    if not modes or bad:
        raise ValueError(f"--decode-kv: expected {', '.join(DECODE_KV_MODES)} (comma-separated),"
                         f" got {text!r}")
    return modes


DECODE_KV_HELP = ("what decode workers keep of a codec's KV: compressed (the codec's pages and "
                  "kernel), dense (received layers dequantized into bf16 pages, bf16 kernel: "
                  "the codec's quality, bf16's kernel) or auto (chosen per deployment from "
                  "measured kernel speed and memory; README)")


def _engine_options(pairs: list[str]) -> dict:
    """["num_pages=4096", "cuda_graphs=false", "graph_batch_sizes=1,2,4"] -> {"num_pages": 4096,
    "cuda_graphs": False, "graph_batch_sizes": (1, 2, 4)}."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine-option: expected key=value, got {pair!r}")
        items = [_option_value(v) for v in value.split(",")]
        out[key] = tuple(items) if "," in value else items[0]
    return out


def _option_value(value: str) -> bool | int | float | str:
    low = value.strip().lower()
    return (True if low == "true" else False if low == "false" else
            int(low) if low.lstrip("-").isdigit() else
            float(low) if low.replace(".", "", 1).lstrip("-").isdigit() else value.strip())


def cmd_bench_jct(args: argparse.Namespace) -> int:
    from zipserve.bench import jct_client, jct_sweep, workloads

    command = "python3 -m zipserve " + " ".join(args.argv)
    codecs = (args.codecs or JCT_CODECS).split(",")
    if args.sweep:
        model = args.model or default_model()
        opts = _engine_options(args.engine_option)
        results = PACKAGE_ROOT / "bench" / "results"
        quality = args.quality_csv or [str(p) for p in sorted(
            [*results.glob("quality*.csv"), *results.glob("quality*/quality.csv")])]
        cfg = jct_sweep.SweepConfig(
            model=model, codecs=tuple(codecs), links=tuple(args.links), rates=tuple(args.rates),
            workload=args.workload, num_requests=args.num_requests, seed=args.seed,
            scale=args.scale, max_seconds=args.max_seconds, device=args.device,
            engine_options=opts, restart_each=args.restart_each,
            decode_kv=tuple(_csv_modes(args.decode_kv or "compressed")),
            num_prefill=args.prefill_workers, num_decode=args.decode_workers,
            quality_csvs=tuple(quality), command=command)
        jct_sweep.run(cfg, Path(args.out))
        return 0
    if not args.url:
        raise ValueError("bench jct: give --url of a running deployment, or --sweep")
    if args.decode_kv is not None:
        raise ValueError("--decode-kv: only with --sweep (a running deployment's lanes were set "
                         "by `zipserve serve --decode-kv`)")
    if args.rate is None and args.workload in workloads.SHAPES:
        raise ValueError(f"--rate: the {args.workload} workload needs an arrival rate")
    wl = workloads.build(args.workload, rate=args.rate, num_requests=args.num_requests,
                         seed=args.seed, scale=args.scale, vocab=args.vocab)
    jct_client.run(args.url, wl, Path(args.out) / "jct_client.csv",
                   allow_remote=args.allow_remote, max_seconds=args.max_seconds,
                   api_key=args.api_key, codec=None if args.codecs is None else codecs[0])
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "jct":
        return cmd_bench_jct(args)
    if args.what == "report":
        from zipserve.bench import jct_report

        dirs = [Path(d) for d in (args.results or [str(PACKAGE_ROOT / "bench" / "results" /
                                                      "jct")])]
        jct_report.write(dirs, Path(args.page or PACKAGE_ROOT / "bench" / "JCT_RESULTS.md"),
                         readme=PACKAGE_ROOT / "README.md" if args.readme else None)
        return 0
    args.codecs = args.codecs or ALL_CODECS
    if args.what == "engine":
        from zipserve.bench import engine_bench

        engine_bench.run(args.model or "random:llama3-8b", args.batches or [1, 16, 64],
                         args.contexts or [2048, 8192], Path(args.out),
                         iters=args.iters, prefill_len=args.prefill_len)
        return 0
    if args.what == "kernels":
        from zipserve.bench import kernel_bench

        codecs = [c for c in args.codecs.split(",") if c in ("fp8", "kivi2", "kivi4", "hack2",
                                                              "hack4", "lowrank")]
        # (lowrank+hack* decode has no kernel yet: compress/lowrank.py)
        kernel_bench.run(Path(args.out), codecs, args.batches or [1, 8, 32],
                         args.contexts or [4096, 32768, 131072])
        return 0
    if args.what == "disagg":
        from zipserve.bench import disagg_bench

        disagg_bench.run(args.model or "random:llama3-8b", args.codecs.split(","),
                         args.prefill_len, args.gen_tokens, [None, args.link_gbps_bench],
                         Path(args.out), device=args.device, kv_path=args.kv_path,
                         decode_kv=_csv_modes(args.decode_kv or "compressed"))
        return 0
    if args.what == "transfer":
        from zipserve.bench import transfer_bench

        transfer_bench.run(Path(args.out), args.channels.split(",") if args.channels else None,
                           int(args.max_mb * (1 << 20)), device=args.device)
        return 0
    if args.what == "quality":
        from zipserve.bench import quality_bench

        quality_bench.run(args.model or default_model(), args.codecs.split(","), Path(args.out),
                          text_dir=args.text_dir, gen_tokens=args.gen_tokens,
                          device=args.device)
        return 0
    if args.what == "lckv":
        from zipserve.bench import lckv_bench

        models = args.models.split(",") if args.models else [
            str(REFERENCE_MODEL), str(PACKAGE_ROOT / "models" / "zipserve-lckv")]
        lckv_bench.run(models, args.lckv_codecs.split(","), args.budget_gb, args.context,
                       args.prefill_len, Path(args.out), iters=args.iters, device=args.device)
        return 0
    if args.what == "load":
        from zipserve.bench import load_bench

        load_bench.run(args.model or default_model(), Path(args.out), args.clients,
                       args.duration, codec=args.codecs.split(",")[0], device=args.device)
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
    t.add_argument("--arch", choices=["llama", "lckv"], default="llama",
                   help="lckv: layer-condensed KV variant (engine/lckv_model.py)")
    t.add_argument("--lckv-warmup", type=int, default=2,
                   help="lckv: warmup layers keeping their own KV (split bottom/top)")
    t.add_argument("--lckv-m", type=int, default=7, help="lckv: passes without gradient")
    t.add_argument("--lckv-b", type=int, default=2, help="lckv: passes with gradient")
    t.add_argument("--tokenizer-from", default=None,
                   help="reuse this model directory's tokenizer instead of training one")
    t.add_argument("--device", default=None)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("calibrate", help="low-rank K/V bases for the lowrank codecs; with "
                       "--kvbits the per-layer bits of hack2mix")
    c.add_argument("--model", default=None, help="default: the shipped reference model")
    c.add_argument("--text-dir", default=None, help="default: this Python's standard library "
                   "(training split only)")
    c.add_argument("--budget", type=float, default=None,
                   help="lowrank: average fraction of K+V dimensions kept (default 0.5 = half the "
                   "bytes); --kvbits: bytes per token as a fraction of bf16's (default 0.25)")
    c.add_argument("--kvbits", action="store_true",
                   help="instead of lowrank bases: measure each layer's sensitivity to 2-bit HACK "
                   "on the training split and write kvbits.json, the per-layer bits of hack2mix")
    c.add_argument("--kvbits-windows", type=int, default=4,
                   help="--kvbits: calibration windows of --window tokens (last half scored)")
    c.add_argument("--min-gain", type=float, default=0.005,
                   help="--kvbits: least predicted perplexity decrease worth a 4-bit layer")
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
    e.add_argument("--lckv-passes", type=int, default=None,
                   help="LCKV models: encode prompts with this many passes (config: m + b)")
    e.set_defaults(func=lambda a: cmd_eval(argparse.Namespace(**{**vars(a),
                                                                 "model": a.model or default_model()})))

    s = sub.add_parser("serve", help="router + prefill/decode workers on Ray")
    s.add_argument("--model", default=None, help="default: the shipped reference model")
    s.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: the last part of --model, "
                        "never its full path)")
    s.add_argument("--codec", default="hack4",
                   help="KV codec; several separated by commas (e.g. hack2,bf16) start workers "
                        "for each, requests pick one with their 'codec' field (default: the first)")
    s.add_argument("--decode-kv", default="compressed", metavar="MODE",
                   help=DECODE_KV_HELP + "; one for every codec, or one per codec in --codec's "
                        "order (default: compressed)")
    s.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an EngineConfig field for every worker's engine, e.g. num_pages=4096, "
                        "gpu_memory_fraction=0.4, graph_batch_sizes=1,2,4 (repeatable)")
    s.add_argument("--skip-tokenizer", action="store_true",
                   help="serve without a tokenizer (a model directory without tokenizer.json): "
                        "prompts as lists of token ids, completions answer with token_ids and "
                        "empty text; text prompts, chat and stop strings get a 400")
    s.add_argument("--prefill", type=int, default=1, help="prefill workers (per codec)")
    s.add_argument("--decode", type=int, default=1, help="decode workers (per codec)")
    s.add_argument("--address", default=None,
                   help="an existing Ray cluster ('auto' or host:port); default: embedded Ray")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback only; 0.0.0.0 exposes the server)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health")
    s.add_argument("--api-key-file", default=None, help="read the API key from this file")
    s.add_argument("--link-gbps", type=float, default=None, help="emulate a link of this speed")
    s.add_argument("--device", default=None)
    lim = s.add_argument_group("admission and limits")
    lim.add_argument("--max-queued-tokens", type=int, default=65536,
                     help="prompt tokens waiting for prefill before new requests get 429")
    lim.add_argument("--max-queued-requests", type=int, default=512,
                     help="requests waiting for prefill before new requests get 429")
    lim.add_argument("--max-prompt-tokens", type=int, default=None,
                     help="longest prompt accepted (default: the model's context)")
    lim.add_argument("--request-timeout", type=float, default=600.0,
                     help="seconds before a request fails with a timeout (a request's "
                          "'timeout' field may ask for less)")
    lim.add_argument("--max-body-bytes", type=int, default=1 << 20,
                     help="largest request body (413 beyond it)")
    lim.add_argument("--header-timeout", type=float, default=10.0,
                     help="seconds a connection has to send a request's headers (408 and "
                          "closed after; bounds slowloris clients)")
    lim.add_argument("--body-timeout", type=float, default=30.0,
                     help="seconds a request has to send its whole body once its headers are "
                          "in (408 and closed after)")
    lim.add_argument("--page-wait", type=float, default=30.0,
                     help="longest a request waits for decode pages on a healthy worker pair")
    lim.add_argument("--transfer-deadline", type=float, default=30.0,
                     help="seconds for a request's KV to reach its decode worker")
    rob = s.add_argument_group("failures and placement")
    rob.add_argument("--max-restarts", type=int, default=3,
                     help="times Ray restarts a worker actor that died")
    rob.add_argument("--retries", type=int, default=1,
                     help="times a request whose worker failed before its first token is "
                          "tried again on another pair")
    rob.add_argument("--prefill-resource", default=None,
                     help="custom Ray resource each prefill actor needs (e.g. zipserve_prefill: "
                          "places prefill actors on the nodes that offer it)")
    rob.add_argument("--decode-resource", default=None,
                     help="custom Ray resource each decode actor needs (e.g. zipserve_decode)")
    s.add_argument("--prefill-group", type=int, default=0, metavar="N",
                   help="a sequence-parallel prefill group of N workers for long prompts (0: off)")
    s.add_argument("--prefill-group-min-tokens", type=int, default=16384, metavar="M",
                   help="prompts of at least M tokens go to the prefill group")
    s.add_argument("--prefill-group-exchange", choices=["lowrank", "full"], default="lowrank",
                   help="with a lowrank codec, what the group's all-to-alls carry: the projected "
                        "Q/K/V (ZeroC; about half the bytes, but prompt tokens attend in the "
                        "reduced space) or the full ones (exact)")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="start the system, send real requests, print a JCT table")
    d.add_argument("--model", default=None, help="default: the shipped reference model")
    d.add_argument("--codecs", default="bf16,hack4,hack2")
    d.add_argument("--max-tokens", type=int, default=32)
    d.add_argument("--port", type=int, default=8765)
    d.add_argument("--link-gbps", type=float, default=None,
                   help="emulated prefill->decode link in Gb/s (0: unlimited; default: the link "
                        "at which the model's KV moves as slowly per token as Llama-3-8B's does "
                        "at 10 Gb/s)")
    d.add_argument("--decode-kv", default="auto", metavar="MODES",
                   help=DECODE_KV_HELP + "; several separated by commas run each codec in each "
                        "(bf16 once). Default auto: dense on the CPU, where the compressed "
                        "kernels run as torch references")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks (GPU)")
    b.add_argument("what", choices=["engine", "kernels", "quality", "disagg", "lckv", "load",
                                    "jct", "report", "transfer"])
    b.add_argument("--clients", type=int, default=64, help="load: concurrent streaming clients")
    b.add_argument("--duration", type=float, default=60.0, help="load: seconds of load")
    b.add_argument("--channels", default=None,
                   help="transfer: host,inproc_device,checksum,cuda_ipc,nccl_self,nccl_pg,"
                        "nccl_ctypes (default: all this machine can run)")
    b.add_argument("--decode-kv", default=None, metavar="MODES",
                   help="disagg, jct --sweep: decode_kv modes to run each codec in, "
                        "comma-separated (default: compressed; bf16 runs once); " + DECODE_KV_HELP)
    b.add_argument("--kv-path", choices=["auto", "host"], default="auto",
                   help="disagg: 'host' forces KV through host memory (the old path)")
    b.add_argument("--max-mb", type=float, default=256,
                   help="transfer: largest message in MiB (sizes 4 KiB x 4^k)")
    b.add_argument("--link-gbps-bench", type=float, default=10.0,
                   help="disagg: the emulated link measured beside no link")
    b.add_argument("--model", default=None,
                   help="default: random:llama3-8b (engine), the reference model (quality)")
    b.add_argument("--codecs", default=None,
                   help=f"default: {ALL_CODECS}; jct --sweep: {JCT_CODECS}; jct --url: the "
                        f"deployment's (a codec given there is sent per request)")
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
    b.add_argument("--models", default=None, help="lckv: comma-separated, the first is the "
                   "baseline (default: models/zipserve-ref,models/zipserve-lckv)")
    b.add_argument("--lckv-codecs", default="bf16,hack2", help="lckv: codecs to stack on top")
    b.add_argument("--budget-gb", type=float, default=8.0, help="lckv: KV memory budget (GiB)")
    b.add_argument("--context", type=int, default=2000, help="lckv: tokens per sequence")
    j = b.add_argument_group("jct (replay a workload over HTTP; --sweep starts the system)")
    j.add_argument("--url", default=None, help="jct: base URL of a running deployment")
    j.add_argument("--allow-remote", action="store_true",
                   help="jct: accept a --url that is not loopback or this machine")
    j.add_argument("--api-key", default=None)
    j.add_argument("--sweep", action="store_true",
                   help="jct: start the system per codec and run every link x rate")
    j.add_argument("--workload", default="long-doc",
                   help="long-doc, chat, or a JSONL trace (arrival_s, prompt_tokens, "
                        "output_tokens)")
    j.add_argument("--rate", type=float, default=None, help="jct --url: arrivals per second")
    j.add_argument("--rates", type=_csv_floats, default=[1.0], help="jct --sweep: e.g. 0.5,1,2")
    j.add_argument("--links", type=_csv_links, default=[None],
                   help="jct --sweep: emulated link Gb/s, e.g. 10,25,100,none")
    j.add_argument("--num-requests", type=int, default=32, help="jct: requests per run")
    j.add_argument("--scale", type=float, default=1.0,
                   help="jct: multiply token lengths (e.g. 0.02 on a CPU)")
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--max-seconds", type=float, default=120.0, help="jct: bound of one run")
    j.add_argument("--vocab", type=int, default=8000,
                   help="jct --url: prompt token ids are drawn below min(vocab, 8000)")
    j.add_argument("--engine-option", action="append", default=[],
                   help="jct --sweep: key=value EngineConfig option for the workers (repeat)")
    j.add_argument("--prefill-workers", type=int, default=1, help="jct --sweep: prefill workers")
    j.add_argument("--decode-workers", type=int, default=1, help="jct --sweep: decode workers")
    j.add_argument("--restart-each", action="store_true",
                   help="jct --sweep: a fresh system for every run (default: one per codec)")
    j.add_argument("--quality-csv", action="append", default=[],
                   help="jct --sweep: bench quality CSV(s) (default: bench/results/quality*.csv "
                        "and bench/results/quality*/quality.csv)")
    j.add_argument("--results", action="append", default=[],
                   help="report: sweep output folder(s) (default: bench/results/jct)")
    j.add_argument("--page", default=None, help="report: default bench/JCT_RESULTS.md")
    j.add_argument("--readme", action="store_true",
                   help="report: also refill the JCT block of README.md")
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
