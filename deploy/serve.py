"""`zipserve serve`: Ray (embedded and loopback-only, or a cluster with --address) + workers + the
HTTP router (uvicorn with header and body read timeouts); `running_server` runs the same in a
thread for the demo (deploy/demo.py), benches and tests."""

from __future__ import annotations

import gc
import os
import socket
import threading
import time
from contextlib import contextmanager

from zipserve.control.config import ServeConfig
from zipserve.control.gil_switch import worker_switch_interval_s
from zipserve.control.multi_codec import make_backend
from zipserve.deploy.local_ray import start_loopback_ray
from zipserve.router.limits import AdmissionConfig
from zipserve.transfer.nccl_env import nccl_env
from zipserve.transfer.ports import bind_socket

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def start_ray(address: str | None) -> None:
    import ray

    worker_switch_interval_s()  # a malformed ZIPSERVE_GIL_SWITCH_MS fails here, not in a worker
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # embedded: a local Ray just for this process, on loopback only
        # the workers see this process's ZIPSERVE_* settings (kernel backend, step trace...)
        env = {k: v for k, v in os.environ.items() if k.startswith("ZIPSERVE_")} | nccl_env()
        start_loopback_ray(
            include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env}
        )


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) (port 0: one the kernel picks), for uvicorn to listen
    on. Binding before Ray starts closes the race a "find a free port, close it, let uvicorn bind
    it later" scheme has: Ray's processes take ports of their own meanwhile (a CI run once failed
    with 'address already in use' that way). A port that cannot be had is a ValueError naming it
    (the CLI prints it without a traceback)."""
    try:
        return bind_socket(host, port)
    except OverflowError:  # bind() refuses ports outside 0..65535 this way
        raise ValueError(f"port: must be in [0, 65535], got {port}") from None
    except socket.gaierror as e:  # the host is no address of this machine's resolver
        raise ValueError(f"host: cannot resolve {host!r}: {e.strerror or e}") from e
    except OSError as e:
        raise ValueError(f"port: cannot listen on {host}:{port}: {e.strerror or e}") from e


@contextmanager
def serve_in_thread(
    app, sock: socket.socket, name: str = "uvicorn", startup_s: float = 60.0, **config
):
    """uvicorn serving app in a daemon thread on the bound socket sock (uvicorn.Config options in
    config); yields the thread once the server accepts connections (RuntimeError if it does not
    within startup_s, or its thread died); on exit stops it, joins the thread and closes sock."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
    thread.start()
    try:
        deadline = time.time() + startup_s
        while not server.started:
            if time.time() > deadline or not thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        yield thread
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def freeze_startup_objects() -> None:
    """Move everything alive after startup (torch, Ray, the model config, ...) out of the
    garbage collector's view: it is never garbage, and full collections that scan it pause the
    router's event loop for tens to hundreds of ms (measured on CPU), which showed up as JCT
    the job's phases could not account for."""
    gc.collect()
    gc.freeze()


@contextmanager
def running_server(
    cfg: ServeConfig,
    host: str,
    port: int,
    address: str | None = None,
    api_key: str | None = None,
    limits: AdmissionConfig | None = None,
):
    """Start Ray, the workers and uvicorn in a thread; yield the base URL; stop everything.
    port 0 picks a free port (the URL names it)."""
    import ray

    from zipserve.router.app import create_app
    from zipserve.router.read_timeouts import uvicorn_options

    sock = bind_listener(host, port)  # before Ray starts, so nothing else can take the port
    port = sock.getsockname()[1]
    own_ray = not ray.is_initialized()
    backend = None
    try:
        start_ray(address)
        backend = make_backend(cfg)
        app = create_app(backend, api_key=api_key, limits=limits)
        with serve_in_thread(app, sock, log_level="warning", **uvicorn_options(limits)):
            freeze_startup_objects()
            yield f"http://{host}:{port}", backend
    finally:
        sock.close()  # also when Ray or the workers failed to start
        if backend is not None:
            backend.shutdown()
        gc.unfreeze()  # let interpreter shutdown finalize them (extensions check for leaks)
        if own_ray:
            ray.shutdown()


def decode_kv_lines(cfg: ServeConfig, backend) -> list[str]:
    """One line per lane: what its decode workers keep of the codec's KV and why (`auto`'s
    choice is made by each worker for its device, so it is only known once they run)."""
    lanes = getattr(backend, "lanes", None) or {cfg.codecs[0]: backend}
    lines = []
    for codec, lane in lanes.items():
        asked = cfg.decode_kv_modes[codec]
        why = f"auto: {lane.decode_kv_reason}" if asked == "auto" else lane.decode_kv_reason
        lines.append(f"zipserve: {codec}: decode KV {lane.decode_kv} ({why})")
    return lines


def serve(
    cfg: ServeConfig,
    host: str,
    port: int,
    address: str | None,
    api_key: str | None,
    limits: AdmissionConfig | None = None,
) -> None:
    import uvicorn

    from zipserve.router.app import create_app
    from zipserve.router.read_timeouts import uvicorn_options

    # Bound before Ray and the workers start: a port in use fails here, at once, and no other
    # process can take it meanwhile; port 0 picks a free one (printed below).
    sock = bind_listener(host, port)
    port = sock.getsockname()[1]
    start_ray(address)
    backend = make_backend(cfg)
    freeze_startup_objects()
    per = " per codec" if cfg.extra_codecs else ""
    print(
        f"zipserve: {cfg.num_prefill} prefill + {cfg.num_decode} decode workers{per} "
        f"({backend.device}), codec {','.join(cfg.codecs)}, model {cfg.model}; "
        f"http://{host}:{port}",
        flush=True,
    )
    for line in decode_kv_lines(cfg, backend):
        print(line, flush=True)
    if host not in LOOPBACK_HOSTS and api_key is None:
        print(
            f"zipserve: warning: listening on {host} without an API key; anyone who can "
            f"reach this port can use the server (--api-key-file)",
            flush=True,
        )
    try:
        config = uvicorn.Config(
            create_app(backend, api_key=api_key, limits=limits),
            host=host,
            port=port,
            log_level="info",
            **uvicorn_options(limits),
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        gc.unfreeze()
        backend.shutdown()
