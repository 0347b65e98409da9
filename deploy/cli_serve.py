"""`zipserve serve` and `zipserve demo`: their options, and the ServeConfig / AdmissionConfig
they become (each validated where it is built: control/config.py, router/limits.py)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from zipserve.deploy.cli_values import (
    DECODE_KV_HELP,
    csv_codecs,
    csv_modes,
    nonneg_float,
    nonneg_int,
    port_number,
    positive_float,
    positive_int,
)
from zipserve.deploy.engine_options import parse_engine_options
from zipserve.deploy.shipped import default_model

if TYPE_CHECKING:  # imported where used: `zipserve --help` stays quick
    from zipserve.control.config import ServeConfig
    from zipserve.router.limits import AdmissionConfig


def serve_config(args: argparse.Namespace, codec: str) -> ServeConfig:
    """`zipserve serve`'s options as a ServeConfig (validated there). codec: one codec, or
    several separated by commas (the first is the default)."""
    from zipserve.control.config import ServeConfig

    first, *extra = [c.strip() for c in codec.split(",")]
    return ServeConfig(
        model=args.model or default_model(),
        codec=first,
        extra_codecs=tuple(extra),
        num_prefill=args.prefill,
        num_decode=args.decode,
        device=args.device,
        link_gbps=args.link_gbps,
        transfer_deadline_s=args.transfer_deadline,
        max_restarts=args.max_restarts,
        retries=args.retries,
        page_wait_s=args.page_wait,
        prefill_resource=args.prefill_resource,
        decode_resource=args.decode_resource,
        prefill_group=args.prefill_group,
        prefill_group_min_tokens=args.prefill_group_min_tokens,
        prefill_group_exchange=args.prefill_group_exchange,
        served_model_name=args.served_model_name,
        engine_options=parse_engine_options(args.engine_option),
        decode_kv=args.decode_kv,
        skip_tokenizer=args.skip_tokenizer,
        prefix_affinity=not args.no_prefix_affinity,
        affinity_slack_tokens=args.affinity_slack_tokens,
        local_prefill_tokens=args.local_prefill_tokens,
    )


def admission_config(args: argparse.Namespace) -> AdmissionConfig:
    from zipserve.router.limits import AdmissionConfig

    return AdmissionConfig(
        max_queued_tokens=args.max_queued_tokens,
        max_queued_jobs=args.max_queued_requests,
        max_prompt_tokens=args.max_prompt_tokens,
        request_timeout_s=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from zipserve.deploy.serve import serve
    from zipserve.router.auth import read_api_key

    key = read_api_key(args.api_key, args.api_key_file)
    limits = admission_config(args)
    serve(serve_config(args, args.codec), args.host, args.port, args.address, key, limits)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from zipserve.deploy.demo import demo

    model = args.model or default_model()
    link = args.link_gbps
    demo(
        model,
        args.codecs.split(","),
        args.max_tokens,
        args.port,
        link or None,
        decode_kv=csv_modes(args.decode_kv),
        calibrate=link is None,
    )
    return 0


def add_serve_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="router + prefill/decode workers on Ray")
    s.add_argument("--model", default=None, help="default: the shipped reference model")
    s.add_argument(
        "--served-model-name",
        default=None,
        help="the model's name in the API (default: the last part of --model, never its full path)",
    )
    s.add_argument(
        "--codec",
        default="hack4",
        help="KV codec; several separated by commas (e.g. hack2,bf16) start workers "
        "for each, requests pick one with their 'codec' field (default: the first)",
    )
    s.add_argument(
        "--decode-kv",
        default="auto",
        metavar="MODE",
        help=DECODE_KV_HELP + "; one for every codec, or one per codec in --codec's "
        "order (default: auto, each decode worker picks for its device)",
    )
    s.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an EngineConfig field for every worker's engine, e.g. num_pages=4096, "
        "gpu_memory_fraction=0.4, graph_batch_sizes=1,2,4 (repeatable)",
    )
    s.add_argument(
        "--skip-tokenizer",
        action="store_true",
        help="serve without a tokenizer (a model directory without tokenizer.json): "
        "prompts as lists of token ids, completions answer with token_ids and "
        "empty text; text prompts, chat and stop strings get a 400",
    )
    s.add_argument("--prefill", type=positive_int, default=1, help="prefill workers (per codec)")
    s.add_argument("--decode", type=positive_int, default=1, help="decode workers (per codec)")
    s.add_argument(
        "--address",
        default=None,
        help="an existing Ray cluster ('auto' or host:port); default: embedded Ray",
    )
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default loopback only; 0.0.0.0 exposes the server)",
    )
    s.add_argument("--port", type=port_number, default=8000)
    s.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health",
    )
    s.add_argument("--api-key-file", default=None, help="read the API key from this file")
    s.add_argument(
        "--link-gbps", type=positive_float, default=None, help="emulate a link of this speed"
    )
    s.add_argument("--device", default=None)
    lim = s.add_argument_group("admission and limits")
    lim.add_argument(
        "--max-queued-tokens",
        type=positive_int,
        default=65536,
        help="prompt tokens waiting for prefill before new requests get 429",
    )
    lim.add_argument(
        "--max-queued-requests",
        type=positive_int,
        default=512,
        help="requests waiting for prefill before new requests get 429",
    )
    lim.add_argument(
        "--max-prompt-tokens",
        type=positive_int,
        default=None,
        help="longest prompt accepted (default: the model's context)",
    )
    lim.add_argument(
        "--request-timeout",
        type=positive_float,
        default=600.0,
        help="seconds before a request fails with a timeout (a request's "
        "'timeout' field may ask for less)",
    )
    lim.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=1 << 20,
        help="largest request body (413 beyond it)",
    )
    lim.add_argument(
        "--header-timeout",
        type=positive_float,
        default=10.0,
        help="seconds a connection has to send a request's headers (408 and "
        "closed after; bounds slowloris clients)",
    )
    lim.add_argument(
        "--body-timeout",
        type=positive_float,
        default=30.0,
        help="seconds a request has to send its whole body once its headers are "
        "in (408 and closed after)",
    )
    lim.add_argument(
        "--page-wait",
        type=positive_float,
        default=30.0,
        help="longest a request waits for decode pages on a healthy worker pair",
    )
    lim.add_argument(
        "--transfer-deadline",
        type=positive_float,
        default=30.0,
        help="seconds for a request's KV to reach its decode worker",
    )
    rob = s.add_argument_group("failures and placement")
    rob.add_argument(
        "--max-restarts",
        type=nonneg_int,
        default=3,
        help="times Ray restarts a worker actor that died",
    )
    rob.add_argument(
        "--retries",
        type=nonneg_int,
        default=1,
        help="times a request whose worker failed before its first token is "
        "tried again on another pair",
    )
    rob.add_argument(
        "--no-prefix-affinity",
        action="store_true",
        help="with several decode workers, pick the least loaded one only (default: prefer the "
        "one whose prefix cache holds the longest part of the prompt, within "
        "--affinity-slack-tokens of the least loaded)",
    )
    rob.add_argument(
        "--affinity-slack-tokens",
        type=nonneg_int,
        default=4096,
        help="how much more load (prompt + max tokens held) a decode worker may carry than the "
        "least loaded and still be preferred for the prefix it holds",
    )
    rob.add_argument(
        "--local-prefill-tokens",
        type=nonneg_int,
        default=128,
        help="when the decode worker's prefix cache holds part of a prompt and at most this "
        "many tokens are left, it computes them itself and no KV crosses the link (0: never)",
    )
    rob.add_argument(
        "--prefill-resource",
        default=None,
        help="custom Ray resource each prefill actor needs (e.g. zipserve_prefill: "
        "places prefill actors on the nodes that offer it)",
    )
    rob.add_argument(
        "--decode-resource",
        default=None,
        help="custom Ray resource each decode actor needs (e.g. zipserve_decode)",
    )
    s.add_argument(
        "--prefill-group",
        type=nonneg_int,
        default=0,
        metavar="N",
        help="a sequence-parallel prefill group of N workers for long prompts (0: off)",
    )
    s.add_argument(
        "--prefill-group-min-tokens",
        type=positive_int,
        default=16384,
        metavar="M",
        help="prompts of at least M tokens go to the prefill group",
    )
    s.add_argument(
        "--prefill-group-exchange",
        choices=["lowrank", "full"],
        default="lowrank",
        help="with a lowrank codec, what the group's all-to-alls carry: the projected "
        "Q/K/V (ZeroC; about half the bytes, but prompt tokens attend in the "
        "reduced space) or the full ones (exact)",
    )
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="start the system, send real requests, print a JCT table")
    d.add_argument("--model", default=None, help="default: the shipped reference model")
    d.add_argument("--codecs", type=csv_codecs, default="bf16,hack4,hack2")
    d.add_argument("--max-tokens", type=positive_int, default=32)
    d.add_argument(
        "--port", type=port_number, default=0, help="the router's port (default 0: any free one)"
    )
    d.add_argument(
        "--link-gbps",
        type=nonneg_float,
        default=None,
        help="emulated prefill->decode link in Gb/s (0: unlimited; default: calibrated on "
        "this machine so that a prompt's dense KV takes ~3x its prefill on the wire, as "
        "Llama-3-8B's does on an H100 at 10 Gb/s)",
    )
    d.add_argument(
        "--decode-kv",
        default="auto",
        metavar="MODES",
        help=DECODE_KV_HELP + "; several separated by commas run each codec in each "
        "(bf16 once). Default auto: dense on the CPU, where the compressed "
        "kernels run as torch references",
    )
    d.set_defaults(func=cmd_demo)
