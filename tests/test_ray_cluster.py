"""`zipserve serve --address auto` on a Ray cluster started with `ray start --head`: the server
joins the cluster, places its workers there and answers a request over HTTP.

The cluster runs in its own session and temp dir (`ray start --block` in a new process group),
found through RAY_ADDRESS as `--address auto` does; it is torn down by
signalling that process group (so other Ray instances on the machine are left alone), also when
the test fails."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from zipserve.deploy.cli import REFERENCE_MODEL

pytestmark = pytest.mark.skipif(shutil.which("ray") is None or not
                                (REFERENCE_MODEL / "config.json").exists(),
                                reason="needs the ray CLI and the reference checkpoint")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen, sig: int, grace_s: float) -> None:
    """Signal the process group this test started, then SIGKILL what is left of it."""
    if True:  # even when the leader has exited: its children may still run
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_address_auto_on_a_ray_start_cluster():
    tmp = tempfile.mkdtemp(prefix="zsray")  # short: Ray's socket paths live under it
    gcs_port, http_port = _port(), _port()
    # a throwaway local cluster: no token auth (else both sides must share ~/.ray/auth_token)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    head = subprocess.Popen(
        ["ray", "start", "--head", f"--port={gcs_port}", "--num-cpus=2",
         "--disable-usage-stats", f"--temp-dir={tmp}",
         "--include-dashboard=false", "--block"],
        cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/head.log", "w"),
        start_new_session=True)
    serve = None
    try:
        serve_env = dict(env, RAY_ADDRESS=f"127.0.0.1:{gcs_port}")
        serve = subprocess.Popen(
            [sys.executable, "-m", "zipserve", "serve", "--address", "auto", "--port",
             str(http_port), "--codec", "bf16", "--device", "cpu"],
            cwd=tmp, env=serve_env, stdout=open(f"{tmp}/serve.log", "w"),
            stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.time() + 120
        health = None
        while time.time() < deadline:
            assert head.poll() is None, open(f"{tmp}/head.log").read()[-3000:]
            assert serve.poll() is None, open(f"{tmp}/serve.log").read()[-3000:]
            try:
                status, health = _get(f"{base}/health")
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        assert health is not None and health["status"] == "ok", \
            open(f"{tmp}/serve.log").read()[-3000:]
        assert {w["name"] for w in health["backend"]["workers"]} == {"prefill-0", "decode-0"}

        req = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(
            {"prompt": "def fibonacci(n):", "max_tokens": 8, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            out = json.loads(r.read())
        assert out["usage"]["completion_tokens"] == 8 and out["choices"][0]["text"]

        log = open(f"{tmp}/serve.log").read()
        # it joined the cluster rather than starting a Ray of its own
        assert "Connecting to existing Ray cluster" in log and \
            "Started a local Ray instance" not in log, log[-3000:]
    finally:
        if serve is not None:
            _stop_group(serve, signal.SIGINT, 15)
        _stop_group(head, signal.SIGTERM, 15)
        shutil.rmtree(tmp, ignore_errors=True)
