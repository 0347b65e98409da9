"""`zipserve serve --address auto` on a Ray cluster started with `ray start --head`: the server
joins the cluster, places its workers there (on the custom resources the prefill and decode
flags name, as the KubeRay manifest's worker groups advertise them) and answers a request over
HTTP. Also: the shipped cluster configs agree with those flags.

The cluster runs in its own session and temp dir (`ray start --block` in a new process group),
found through RAY_ADDRESS as `--address auto` does; it is torn down by
signalling that process group (so other Ray instances on the machine are left alone), also when
the test fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.transfer.ports import free_port as _port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("ray") is None or not (REFERENCE_MODEL / "config.json").exists(),
        reason="needs the ray CLI and the reference checkpoint",
    ),
]


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
    gcs_port = _port()
    # a throwaway local cluster: no token auth (else both sides must share ~/.ray/auth_token)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            f"--port={gcs_port}",
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--temp-dir={tmp}",
            '--resources={"zipserve_prefill": 1, "zipserve_decode": 1}',
            "--include-dashboard=false",
            "--block",
        ],
        cwd=tmp,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(f"{tmp}/head.log", "w"),
        start_new_session=True,
    )
    serve = None
    try:
        serve_env = dict(env, RAY_ADDRESS=f"127.0.0.1:{gcs_port}")
        serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "zipserve",
                "serve",
                "--address",
                "auto",
                "--port",
                "0",  # a free one, bound before Ray starts; the server prints which
                "--codec",
                "bf16",
                "--device",
                "cpu",
                "--prefill-resource",
                "zipserve_prefill",
                "--decode-resource",
                "zipserve_decode",
            ],
            cwd=tmp,
            env=serve_env,
            stdout=open(f"{tmp}/serve.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 120
        health, base = None, None
        while time.time() < deadline:
            assert head.poll() is None, open(f"{tmp}/head.log").read()[-3000:]
            assert serve.poll() is None, open(f"{tmp}/serve.log").read()[-3000:]
            if base is None:  # the startup line names the port it got
                found = re.search(r"http://127\.0\.0\.1:(\d+)", open(f"{tmp}/serve.log").read())
                base = found and f"http://127.0.0.1:{found.group(1)}"
            try:
                if base is not None:
                    status, health = _get(f"{base}/health")
                    if status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        assert health is not None and health["status"] == "ok", open(f"{tmp}/serve.log").read()[
            -3000:
        ]
        assert {w["name"] for w in health["backend"]["workers"]} == {"prefill-0", "decode-0"}

        req = urllib.request.Request(
            f"{base}/v1/completions",
            data=json.dumps(
                {"prompt": "def fibonacci(n):", "max_tokens": 8, "temperature": 0}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            out = json.loads(r.read())
        assert out["usage"]["completion_tokens"] == 8 and out["choices"][0]["text"]

        log = open(f"{tmp}/serve.log").read()
        # it joined the cluster rather than starting a Ray of its own
        assert (
            "Connecting to existing Ray cluster" in log
            and "Started a local Ray instance" not in log
        ), log[-3000:]

        # each actor holds the one unit of its custom resource that the cluster offers. Asked
        # from a child process: Ray keeps its auth mode for the life of a process, so joining
        # this no-auth cluster from here would break every later embedded Ray in this run.
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import json, ray; ray.init(log_to_driver=False); "
                "print(json.dumps([ray.cluster_resources(), ray.available_resources()]))",
            ],
            env=serve_env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp,
        )
        assert probe.returncode == 0, probe.stderr[-3000:]
        total, free = json.loads(probe.stdout.strip().splitlines()[-1])
        for r in ("zipserve_prefill", "zipserve_decode"):
            assert total[r] == 1 and free.get(r, 0) == 0, (total, free)
    finally:
        if serve is not None:
            _stop_group(serve, signal.SIGINT, 15)
        _stop_group(head, signal.SIGTERM, 15)
        shutil.rmtree(tmp, ignore_errors=True)


def test_cluster_configs_match_the_serve_flags():
    import yaml

    from zipserve.deploy.cli import PACKAGE_ROOT, build_parser

    launcher = yaml.safe_load((PACKAGE_ROOT / "deploy" / "ray-cluster.yaml").read_text())
    types = launcher["available_node_types"]
    assert types["prefill_gpu"]["resources"]["zipserve_prefill"] == 1
    assert types["decode_gpu"]["resources"]["zipserve_decode"] == 1

    docs = list(
        yaml.safe_load_all((PACKAGE_ROOT / "deploy" / "kuberay-raycluster.yaml").read_text())
    )
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    for group, resource in (("prefill-gpu", "zipserve_prefill"), ("decode-gpu", "zipserve_decode")):
        params = groups[group]["rayStartParams"]
        assert json.loads(json.loads(params["resources"])) == {resource: 1}
        assert params["num-gpus"] == "1"
    router = next(
        c
        for c in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
        if c["name"] == "router"
    )
    cmd = router["args"][0].split("exec zipserve ", 1)[1].split()
    args = build_parser().parse_args(cmd)  # the manifest's command is a valid one
    assert args.address == "auto" and args.api_key_file and args.host == "0.0.0.0"
    assert (args.prefill_resource, args.decode_resource) == ("zipserve_prefill", "zipserve_decode")
