"""`zipserve serve` and `zipserve demo`: Ray (embedded, or a cluster with --address) + workers +
the HTTP router; the demo also sends real requests over HTTP and prints a JCT table."""

from __future__ import annotations

import gc
import json
import os
import threading
import time
import urllib.request
from contextlib import contextmanager

from zipserve.deploy.multi_codec import make_backend
from zipserve.deploy.ray_backend import ServeConfig
from zipserve.router.limits import AdmissionConfig

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

DEMO_PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n\ndef main():",
    "class Stack:\n    def __init__(self):",
    "def read_config(path):\n    \"\"\"Read a JSON config file.\"\"\"",
]


def start_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # embedded: a local Ray just for this process
        ray.init(include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"NCCL_NVLS_ENABLE": "0"}})


def freeze_startup_objects() -> None:
    """Move everything alive after startup (torch, Ray, the model config, ...) out of the
    garbage collector's view: it is never garbage, and full collections that scan it pause the
    router's event loop for tens to hundreds of ms (measured on CPU), which showed up as JCT
    the job's phases could not account for."""
    gc.collect()
    gc.freeze()


@contextmanager
def running_server(cfg: ServeConfig, host: str, port: int, address: str | None = None,
                   api_key: str | None = None, limits: AdmissionConfig | None = None):
    """Start Ray, the workers and uvicorn in a thread; yield the base URL; stop everything."""
    import ray
    import uvicorn
    from zipserve.router.app import create_app

    own_ray = not ray.is_initialized()
    start_ray(address)
    backend = make_backend(cfg)
    app = create_app(backend, api_key=api_key, limits=limits)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.05)
    freeze_startup_objects()
    try:
        yield f"http://{host}:{port}", backend
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        backend.shutdown()
        gc.unfreeze()  # let interpreter shutdown finalize them (extensions check for leaks)
        if own_ray:
            ray.shutdown()


def serve(cfg: ServeConfig, host: str, port: int, address: str | None,
          api_key: str | None, limits: AdmissionConfig | None = None) -> None:
    import uvicorn
    from zipserve.router.app import create_app

    start_ray(address)
    backend = make_backend(cfg)
    freeze_startup_objects()
    per = " per codec" if cfg.extra_codecs else ""
    print(f"zipserve: {cfg.num_prefill} prefill + {cfg.num_decode} decode workers{per} "
          f"({backend.device}), codec {','.join(cfg.codecs)}, model {cfg.model}; "
          f"http://{host}:{port}",
          flush=True)
    if host not in LOOPBACK_HOSTS and api_key is None:
        print(f"zipserve: warning: listening on {host} without an API key; anyone who can "
              f"reach this port can use the server (--api-key-file)", flush=True)
    try:
        uvicorn.run(create_app(backend, api_key=api_key, limits=limits), host=host, port=port,
                    log_level="info")
    finally:
        gc.unfreeze()
        backend.shutdown()


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _get(url: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _stream(url: str, body: dict, timeout: float = 120) -> str:
    req = urllib.request.Request(url, data=json.dumps(dict(body, stream=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    text = ""
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0].get("text") or ""
            print(delta, end="", flush=True)
            text += delta
    print()
    return text


def demo(model: str, codecs: list[str], max_tokens: int, port: int,
         decode_kv: list[str] | tuple[str, ...] = ("compressed",)) -> list[dict]:
    """For each codec (in each decode_kv mode): start the system, send the demo prompts over
    HTTP (the first streamed to the terminal), and collect each job's phases from
    /v1/jobs/{id}."""
    from zipserve.engine.decode_kv import codec_modes

    runs, skipped = codec_modes(codecs, decode_kv)
    for note in skipped:
        print(f"(skipped {note})")
    rows = []
    for codec, mode in runs:
        cfg = ServeConfig(model=model, codec=codec, decode_kv=mode)
        print(f"\n=== codec {codec}, decode-kv {mode}: starting Ray, 1 prefill + 1 decode "
              f"worker, router ...")
        with running_server(cfg, "127.0.0.1", port) as (base, backend):
            url = f"{base}/v1/completions"
            body = {"prompt": DEMO_PROMPTS[0], "max_tokens": max_tokens, "temperature": 0}
            print(f"--- streaming {DEMO_PROMPTS[0]!r}:")
            print(DEMO_PROMPTS[0], end="")
            _stream(url, body)
            for prompt in DEMO_PROMPTS:
                out = _post(url, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
                job = _get(f"{base}/v1/jobs/{out['id']}")
                rows.append(dict(codec=codec, decode_kv=backend.decode_kv, job=job,
                                 prompt=prompt))
        time.sleep(0.5)
    _print_table(rows)
    import torch

    if not torch.cuda.is_available():
        print("\n(CPU: compressed codecs decode through the torch references of their Triton "
              "kernels here, so their decode times say nothing about GPU speed; GPU numbers: "
              "bench/RESULTS.md. decode KV dense: the codec's KV dequantized into bf16 pages "
              "on arrival, decoded by the bf16 kernel)")
    return rows


def _print_table(rows: list[dict]) -> None:
    phases = ["queue", "prefill", "transfer", "decode_queue", "decode"]
    print("\n| codec | decode KV | prompt tok | out tok | "
          + " | ".join(f"{p} ms" for p in phases) + " | TTFT ms | JCT ms | KV sent | vs bf16 |")
    print("|---|---|---|---|" + "---|" * len(phases) + "---|---|---|---|")
    for r in rows:
        j = r["job"]
        durations = {p["name"]: p.get("duration") for p in j.get("phases", [])}
        cells = [f"{1e3 * durations[p]:.1f}" if durations.get(p) is not None else "-"
                 for p in phases]
        ttft, jct = j.get("ttft"), j.get("jct")
        sent, dense = j.get("kv_bytes"), j.get("kv_bytes_bf16")
        kv = (f"{sent / 1024:.1f} KiB | {sent / dense:.2f}x" if sent is not None and dense
              else "- | -")
        print(f"| {r['codec']} | {r.get('decode_kv', '-')} | {j.get('prompt_tokens')} | "
              f"{j.get('completion_tokens')} | "
              + " | ".join(cells)
              + f" | {1e3 * ttft:.1f} | {1e3 * jct:.1f} | {kv} |"
              if ttft is not None and jct is not None
              else f"| {r['codec']} | job record incomplete: {j} |")


os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
