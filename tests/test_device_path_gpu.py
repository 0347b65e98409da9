"""The device KV path on real GPUs: in-process device form == host form bit for bit (and the
workers pick it by themselves), CUDA IPC between two processes on one GPU (picked by
connect_pair), the ctypes NCCL binding on one GPU (send to and receive from itself in a group),
and on two GPUs the pair picks NCCL and moves device layers equal to the host form. The
two-process harness also runs on the CPU (host path), so CI checks the test itself."""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import queue
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.transfer.nccl_env import apply_nccl_defaults
from zipserve.transfer.ports import free_port

MODEL = str(REFERENCE_MODEL)
JOIN_S = 150
STACK_DUMP_S = JOIN_S - 30
"""A rank still running after this many seconds writes every thread's stack to a file that
the test then reports, so a hang shows where it is instead of only timing out."""
POOL_PAGES = 1024
"""Several engines share one GPU here: each gets a fixed pool instead of sizing it from the
device's memory (the first would take gpu_memory_fraction of it)."""


def _cuda(n: int = 1) -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= n


def _cuda_engines(codec: str, decode_kv: str | None = None):
    """A prefill and a decode engine on the GPU (fixed pools, no CUDA graphs, no prefix cache:
    the same prompt twice computes the same KV), the decode side with `decode_kv` (None: the
    config's default)."""
    from zipserve.engine.config import EngineConfig
    from zipserve.engine.disaggregated import DisaggregatedEngine

    cfg = EngineConfig(codec=codec, cuda_graphs=False, num_pages=POOL_PAGES, prefix_caching=False)
    pre = DisaggregatedEngine(MODEL, device="cuda", engine_config=cfg)
    dec_cfg = cfg if decode_kv is None else dataclasses.replace(cfg, decode_kv=decode_kv)
    return pre, DisaggregatedEngine(MODEL, device="cuda", engine_config=dec_cfg)


@contextlib.contextmanager
def _no_host_waits():
    """Inside, any host synchronization with the GPU raises (after the queued work has run)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _reserved_and_exported(codec: str, decode_kv: str | None = None):
    """An engine pair on the GPU, request "r" (a 697-token prompt) reserved on the decode side and
    prefilled on the other into device-form layers: (prefill, decode, layers)."""
    from zipserve.engine.sampling_params import SamplingParams

    pre, dec = _cuda_engines(codec, decode_kv)
    prompt, params = list(range(3, 700)), SamplingParams(max_tokens=4)
    dec.reserve("r", prompt, params)
    layers = []
    pre.prefill_export(prompt, params, "r", on_layer=layers.append, device_form=True)
    return pre, dec, layers


def _layer_rows(eng, rid: str):
    """Per layer: the request's KV as the decode side holds it, reduced to what is defined
    (dense: the first n token rows; compressed: full encoded pages + the 16-bit tail)."""
    from zipserve.compress.wire import unpack_pages
    from zipserve.engine.kv_cache import KVCache
    from zipserve.engine.kv_export import export_layer

    seq = eng._seqs[rid]
    out = []
    for layer in range(eng.config.num_layers):
        kv = export_layer(eng.cache, layer, seq, num_tokens=seq.num_tokens)
        pages = unpack_pages(kv.pages).tensors
        if isinstance(eng.cache, KVCache):  # [pages, KVH, P, D] -> [tokens, KVH, D]
            pages = {k: t.transpose(1, 2).flatten(0, 1)[: seq.num_tokens] for k, t in pages.items()}
        out.append(
            {
                **{k: t.view(torch.uint8) for k, t in pages.items()},
                **{k: t.view(torch.uint8) for k, t in kv.tail.items()},
            }
        )
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=False)
    )


# -- in-process --------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("codec", ["bf16", "hack2"])
def test_inprocess_device_form_equals_host_form(codec):
    from zipserve.compress.wire import DeviceLayerKV
    from zipserve.engine.sampling_params import SamplingParams

    assert _cuda()
    # the same prompt twice: without a prefix cache both prefills compute the same KV (with
    # one the second reuses the first's pages, and a lossy codec's bytes differ)
    pre, dec = _cuda_engines(codec)
    prompt, params = list(range(3, 700)), SamplingParams(max_tokens=4)
    for rid, form in (("host", False), ("dev", True)):
        dec.reserve(rid, prompt, params)
        layers = []
        pre.prefill_export(prompt, params, rid, on_layer=layers.append, device_form=form)
        assert all(isinstance(kv, DeviceLayerKV) == form for kv in layers)
        if form:
            assert all(kv.wire.payload.is_cuda for kv in layers)
        for kv in layers:
            dec.import_layer(rid, kv)
    assert _same(_layer_rows(dec, "host"), _layer_rows(dec, "dev"))
    dec.abort("host"), dec.abort("dev")
    assert dec.pool.num_used == 0 and pre.pool.num_used == 0


@pytest.mark.gpu
@pytest.mark.parametrize(
    "codec,decode_kv", [("bf16", "auto"), ("hack2", "compressed"), ("hack2", "dense")]
)
def test_import_of_device_layers_never_waits_for_the_gpu(codec, decode_kv):
    """Once a received layer is verified (the receive thread does that, off the step loop),
    importing it queues work without one host synchronization: the step loop imports between
    decode steps, and on a GPU shared with a prefill each wait cost a time slice (H100, session
    13: hack2's 8 page-id copies made a layer's import 5.7 ms and the decode's TBT p99 ~200 ms)."""
    assert _cuda()
    pre, dec, layers = _reserved_and_exported(codec, decode_kv)
    assert all(kv.verify() for kv in layers)
    with _no_host_waits():
        for kv in layers:
            dec.import_layer("r", kv)
    dec.abort("r")
    assert dec.pool.num_used == 0 and pre.pool.num_used == 0


def test_host_syncs_records_the_line_that_waited():
    """The recorder the prefill test below relies on: a `.item()` is one wait, on its line; on a
    CPU nothing waits and nothing is recorded."""
    from zipserve.bench.host_syncs import host_syncs, summary

    with host_syncs("cpu") as waits:
        torch.ones(3).sum().item()
    assert waits == [] and summary(waits) == "no waits"
    if not _cuda():
        return
    x = torch.ones(3, device="cuda")
    with host_syncs("cuda") as waits:
        x.sum().item()
    assert len(waits) == 1 and waits[0].startswith("tests/test_device_path_gpu.py:"), waits
    assert summary(waits).startswith("1 waits: tests/test_device_path_gpu.py:")


@pytest.mark.gpu
@pytest.mark.parametrize("codec", ["bf16", "fp8", "kivi2", "hack2", "lowrank+hack2"])
def test_prefill_export_waits_only_for_its_first_token(codec):
    """A device-form prefill with its per-layer export queues every layer's work without waiting
    for the GPU; the one wait is the sampler's, for the first token. Each other wait idles the GPU
    for the launches after it: the compressed caches' page-id copies did, once per layer (H100,
    session 17: hack2's export cost 11 ms of a 4k prefill, bf16's 0.1)."""
    from zipserve.bench.host_syncs import host_syncs
    from zipserve.engine.config import EngineConfig
    from zipserve.engine.disaggregated import DisaggregatedEngine
    from zipserve.engine.sampling_params import SamplingParams

    assert _cuda()
    cfg = EngineConfig(codec=codec, cuda_graphs=False, num_pages=POOL_PAGES, prefix_caching=False)
    pre = DisaggregatedEngine(MODEL, device="cuda", engine_config=cfg)
    prompt, params = list(range(3, 700)), SamplingParams(max_tokens=1)
    pre.prefill_export(prompt, params, "warm-up", device_form=True)  # compiles, sizes the caches
    torch.cuda.synchronize()
    with host_syncs("cuda") as waits:
        res = pre.prefill_export(prompt, params, "r", device_form=True)
    assert len(res.layers) == pre.config.num_layers
    first_token = ("engine/sampler.py", "engine/disaggregated.py")
    assert [w for w in waits if not w.startswith(first_token)] == [], waits
    assert pre.pool.num_used == 0


@pytest.mark.gpu
def test_receiving_device_layers_never_waits_for_the_gpu():
    """The receive thread takes a device layer without one host synchronization: its checksum
    is queued and read only once computed (`settled`). Waiting there per layer let the thread
    take one layer per decode step on a busy GPU (H100, session 14: transfer phases of 0.1-2 s
    with no link). Then the layers import without waiting either, and their checksums match."""
    from zipserve.transfer.inprocess import InProcessChannel
    from zipserve.transfer.kv_messages import recv_layer, send_layer, settled

    assert _cuda()
    pre, dec, layers = _reserved_and_exported("hack2")
    a, b = InProcessChannel.pair()
    for kv in layers:
        send_layer(a, kv, 5)
    with _no_host_waits():
        got = [recv_layer(b, 5, timeout=1) for _ in layers]
    deadline = time.time() + 10
    while not all(settled(kv) for kv in got) and time.time() < deadline:
        time.sleep(0.001)
    assert all(settled(kv) for kv in got)
    with _no_host_waits():
        for kv in got:
            dec.import_layer("r", kv)
    assert all(kv.verify() for kv in got)
    dec.abort("r")
    assert dec.pool.num_used == 0 and pre.pool.num_used == 0


@pytest.mark.gpu
@pytest.mark.parametrize("codec", ["bf16", "hack2"])
def test_workers_on_one_gpu_use_device_path_and_equal_engine(codec):
    from zipserve.decode_worker.worker import DecodeWorker
    from zipserve.engine.llm import LLM, SamplingParams
    from zipserve.prefill_worker.worker import PrefillWorker
    from zipserve.transfer.inprocess import InProcessChannel

    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompt = list(range(3, 600))
    opts = {"cuda_graphs": False, "num_pages": POOL_PAGES}
    want = LLM(MODEL, device="cuda", codec=codec, **opts).generate([prompt], params)[0]
    a, b = InProcessChannel.pair()
    kinds = []
    send = a.send
    a.send = lambda buf, tag: (kinds.append(getattr(buf, "device", "host")), send(buf, tag))[1]
    pre = PrefillWorker(MODEL, codec, "cuda", engine_options=opts)
    dec = DecodeWorker(MODEL, codec, "cuda", engine_options=opts)
    pre.attach("d0", a)
    dec.attach("p0", b)
    try:
        dec.reserve("q", prompt, params)
        rep = pre.prefill("q", prompt, params, "d0")
        res = dec.admit("q", rep.first_token, rep.first_logprob, timeout=30)
        while not res.finished:
            res = dec.poll("q", 0, timeout=10)
        assert res.error is None and res.tokens == want.token_ids
        assert kinds == ["host", torch.device("cuda", 0)] * dec.num_layers  # never staged
        dec.release("q")
        s = dec.stats()
        assert s.free_pages == s.capacity_pages and pre.stats().used_pages == 0
    finally:
        dec.shutdown()


# -- two processes -----------------------------------------------------------------------------
def _pair_role(
    rank: int,
    port: int,
    dev: str,
    codec: str,
    path: str,
    results,
    finished,
    dump_dir: str,
    busy_cycles: int = 0,
    returns_busy_cycles: int = 0,
) -> None:
    """rank 0: prefill the same prompt twice (host form, then device form) and send both over
    the channel connect_pair picks; rank 1: import both into reserved pages, compare, free.
    busy_cycles: rank 0 queues a GPU sleep this long on its stream before sending the device
    form (the next layers of a forward pass, as far as the receiver can tell); rank 1 reports
    how long its imports of that form took, its stream synchronized (`import_s`).
    returns_busy_cycles: rank 1 keeps the device form's layers, hands them to a BufferReturns
    (as the decode worker's step loop does), queues a GPU sleep this long on its default stream
    (the next decode step) and reports how long giving them back took (`give_back_s`) and how
    long the sleep went on after it (`busy_after_s`)."""
    dump = open(Path(dump_dir) / f"rank{rank}.stacks", "w")  # noqa: SIM115 (lives as long as we do)
    faulthandler.dump_traceback_later(STACK_DUMP_S, file=dump)
    try:
        from zipserve.compress.wire import DeviceLayerKV
        from zipserve.engine.config import EngineConfig
        from zipserve.engine.disaggregated import DisaggregatedEngine
        from zipserve.engine.sampling_params import SamplingParams
        from zipserve.transfer.kv_messages import done, recv_layer, send_layer, use_device_form
        from zipserve.transfer.pairing import connect_pair

        if dev != "cpu":
            torch.cuda.set_device(torch.device(dev))
        eng = DisaggregatedEngine(
            MODEL,
            device=dev,
            # the same prompt twice: both prefills must compute it (no prefix cache)
            engine_config=EngineConfig(
                codec=codec, cuda_graphs=False, num_pages=POOL_PAGES, prefix_caching=False
            ),
        )
        info = {
            "model": eng.model_name,
            "codec": codec,
            "num_layers": eng.config.num_layers,
            "page_size": eng.engine_config.page_size,
            "device": dev,
        }
        ch = connect_pair(info, "127.0.0.1", port, rank, "t", timeout_s=60, path=path)
        prompt, params, n_layers = (
            list(range(3, 700)),
            SamplingParams(max_tokens=4),
            eng.config.num_layers,
        )
        out = {"path": ch.path, "device_form": use_device_form(ch, eng.device)}
        if rank == 0:
            for rid, form in (("host", False), ("dev", True)):
                layers = []
                eng.prefill_export(prompt, params, rid, on_layer=layers.append, device_form=form)
                if form and busy_cycles:
                    torch.cuda._sleep(busy_cycles)
                for kv in layers:
                    send_layer(ch, kv, 1)
                del layers
            if ch.acknowledges:
                out["acked"] = ch.wait_acked(60) and ch.inflight == 0
            finished.wait(120)  # the receiver is through (NCCL endpoints are one-way)
            out["used_pages"] = eng.pool.num_used
        else:
            forms = []
            for rid in ("host", "dev"):
                eng.reserve(rid, prompt, params)
                kept = [] if returns_busy_cycles and rid == "dev" else None
                t0 = None
                for _ in range(n_layers):
                    kv = recv_layer(ch, 1, timeout=120)
                    t0 = time.monotonic() if t0 is None else t0
                    forms.append(
                        type(kv).__name__
                        + (
                            ":" + str(kv.wire.payload.device)
                            if isinstance(kv, DeviceLayerKV)
                            else ""
                        )
                    )
                    try:
                        eng.import_layer(rid, kv)
                    finally:
                        kept.append(kv) if kept is not None else done(kv)
                if kept is not None:
                    from zipserve.decode_worker.buffer_returns import BufferReturns

                    returns = BufferReturns()
                    returns.give_back(kept, torch.device(dev))
                    del kept
                    began, ended = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                    began.record()
                    _queue_busy_work(returns_busy_cycles)  # the next decode step
                    ended.record()
                    t1 = time.monotonic()
                    returns.close(timeout=60)
                    out["give_back_s"] = time.monotonic() - t1
                    t2 = time.monotonic()
                    torch.cuda.synchronize()
                    out["busy_after_s"] = time.monotonic() - t2
                    out["busy_s"] = began.elapsed_time(ended) / 1e3
                    out["return_failures"] = returns.failures
                if dev != "cpu":
                    torch.cuda.synchronize()
                out[f"import_s_{rid}"] = time.monotonic() - t0
            out["equal"] = _same(_layer_rows(eng, "host"), _layer_rows(eng, "dev"))
            out["forms"] = sorted(set(forms))
            eng.abort("host"), eng.abort("dev")
            out["used_pages"] = eng.pool.num_used
            out["open_leases"] = ch.open_leases if ch.leases else 0
            out["kept_segments"] = getattr(ch, "kept_segments", 0)
            finished.set()
        time.sleep(0.5)
        ch.close()
        results.put((rank, "ok", out))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def _queue_busy_work(cycles: int) -> None:
    """Queue GPU work on the current stream that keeps it busy for about `cycles` GPU clock
    cycles: a spin kernel, then large matrix products as long again at H100/H200 speeds
    (session 27's H200 run found the default stream idle 3 ms after a 3e9-cycle spin was
    queued; the products keep the wait real whatever the spin did, and the caller measures the
    busy time with events)."""
    torch.cuda._sleep(cycles)
    a = torch.ones(16384, 16384, dtype=torch.bfloat16, device="cuda")  # 8.8 TFLOP a product
    out = torch.empty_like(a)
    for _ in range(max(1, cycles // 24_000_000)):  # ~12-15 ms each: as long as the spin
        torch.matmul(a, a, out=out)


def _run_pair(
    devices: tuple[str, str],
    codec: str,
    path: str = "auto",
    busy_cycles: int = 0,
    returns_busy_cycles: int = 0,
) -> dict:
    ctx = mp.get_context("spawn")
    port, results, finished = free_port(), ctx.Queue(), ctx.Event()
    dump_dir = tempfile.mkdtemp(prefix="zipserve-pair-")
    apply_nccl_defaults()  # inherited by the spawned ranks
    procs = [
        ctx.Process(
            target=_pair_role,
            daemon=True,
            args=(
                rank,
                port,
                devices[rank],
                codec,
                path,
                results,
                finished,
                dump_dir,
                busy_cycles,
                returns_busy_cycles,
            ),
        )
        for rank in (0, 1)
    ]
    for p in procs:
        p.start()
    out = {}
    try:
        deadline = time.monotonic() + JOIN_S
        while len(out) < 2:
            try:
                rank, status, value = results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                stacks = "\n".join(
                    f"--- {f.name}\n{f.read_text()}"
                    for f in sorted(Path(dump_dir).glob("*.stacks"))
                )
                pytest.fail(
                    f"ranks {sorted({0, 1} - set(out))} did not finish in {JOIN_S} s; "
                    f"their stacks after {STACK_DUMP_S} s:\n{stacks}"
                )
            assert status == "ok", f"rank {rank} failed:\n{value}"
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return out


def test_pair_of_cpu_processes_takes_host_path_and_both_forms_agree():
    """The harness of the GPU pair tests, on the CPU (gloo, host bytes): so that a failure on
    a GPU is the device path's, not this test's."""
    res = _run_pair(("cpu", "cpu"), "hack2")
    assert res[0]["path"] == res[1]["path"] == "host" and not res[0]["device_form"]
    assert res[1]["equal"] and res[0]["used_pages"] == res[1]["used_pages"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("codec", ["bf16", "hack2"])
def test_cuda_ipc_between_two_processes_on_one_gpu(codec):
    assert _cuda()
    res = _run_pair(("cuda:0", "cuda:0"), codec)
    assert res[0]["path"] == res[1]["path"] == "cuda_ipc"
    assert res[0]["device_form"] and res[1]["forms"] == ["DeviceLayerKV:cuda:0", "LayerKV"]
    assert res[1]["equal"], "IPC-imported KV differs from the host form"
    assert res[0]["acked"] and res[1]["open_leases"] == 0
    assert res[0]["used_pages"] == res[1]["used_pages"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("codec", ["bf16", "hack2"])
def test_cuda_ipc_with_segments_kept_mapped(codec, monkeypatch):
    """ZIPSERVE_IPC_KEEP_MAPPED=1 (the spawned ranks inherit it): the same KV arrives, every
    buffer is acknowledged and every page freed, and the receiver keeps some segments mapped."""
    assert _cuda()
    monkeypatch.setenv("ZIPSERVE_IPC_KEEP_MAPPED", "1")
    res = _run_pair(("cuda:0", "cuda:0"), codec)
    assert res[0]["path"] == res[1]["path"] == "cuda_ipc" and res[1]["equal"]
    assert res[0]["acked"] and res[1]["open_leases"] == 0
    assert res[1]["kept_segments"] > 0, res[1]
    assert res[0]["used_pages"] == res[1]["used_pages"] == 0


@pytest.mark.gpu
def test_cuda_ipc_receiver_does_not_wait_for_the_senders_later_work():
    """The sender's GPU stays busy (~1-2 s of sleep queued behind the gathered layers, as the
    rest of a forward pass would be) while it sends: the receiver maps, imports and
    synchronizes every layer long before that work ends. Before DeviceLayerKV.sending and
    CudaIpcChannel's own mapping stream, the receiver's stream waited for all of it (a
    decode step stalled for a whole prefill each time a request's KV arrived)."""
    assert _cuda()
    busy = 3_000_000_000  # GPU clock cycles: 1.5-2 s at H100/H200 clocks
    res = _run_pair(("cuda:0", "cuda:0"), "hack2", busy_cycles=busy)
    assert res[0]["path"] == "cuda_ipc" and res[1]["equal"]
    assert res[1]["import_s_dev"] < 0.5, res[1]
    assert res[0]["acked"] and res[1]["open_leases"] == 0
    assert res[0]["used_pages"] == res[1]["used_pages"] == 0


@pytest.mark.gpu
def test_giving_cuda_ipc_layers_back_does_not_wait_for_the_decode_stream():
    """The decode worker gives imported CUDA-IPC layers back from a thread of its own while the
    step loop goes on queueing decode steps on the default stream (here: 1.5-4 s of GPU work).
    Giving them back waits for the imports' reads only, not for the step queued after them: on
    the default stream, CudaIpcChannel's release and torch's deleter of the received storage
    (that one with the GIL held) each waited for it, freezing the decode process for a step
    per batch given back (100-160 ms on a GPU time-sliced with a prefill; session 26)."""
    assert _cuda()
    busy = 3_000_000_000  # GPU clock cycles: 1.5-2 s at H100/H200 clocks
    res = _run_pair(("cuda:0", "cuda:0"), "hack2", returns_busy_cycles=busy)
    assert res[0]["path"] == "cuda_ipc" and res[1]["equal"]
    assert res[1]["return_failures"] == 0
    assert res[1]["busy_s"] > 0.5, res[1]  # the queued work did keep the GPU busy
    assert res[1]["busy_after_s"] > 0.3 * res[1]["busy_s"], res[1]  # still running: no wait
    assert res[1]["give_back_s"] < 0.3, res[1]
    assert res[0]["acked"] and res[1]["open_leases"] == 0
    assert res[0]["used_pages"] == res[1]["used_pages"] == 0


@pytest.mark.multi_gpu
@pytest.mark.parametrize(
    "codec, path, want",
    [("bf16", "auto", "nccl"), ("hack2", "auto", "nccl"), ("bf16", "nccl_ctypes", "nccl_ctypes")],
)
def test_nccl_pair_between_two_gpus(codec, path, want):
    """Auto picks the NCCL process group; the ctypes-binding channel carries the same."""
    assert _cuda(2)
    res = _run_pair(("cuda:0", "cuda:1"), codec, path)
    assert res[0]["path"] == res[1]["path"] == want
    assert res[1]["forms"] == ["DeviceLayerKV:cuda:1", "LayerKV"] and res[1]["equal"]
    assert res[0]["used_pages"] == res[1]["used_pages"] == 0


# -- ctypes NCCL on one GPU --------------------------------------------------------------------
@pytest.mark.gpu
def test_ctypes_nccl_one_rank_send_to_self():
    from zipserve.transfer import nccl

    assert nccl.nccl_available(), "torch's libnccl was not found"
    dev = torch.device("cuda", 0)
    comm = nccl.NcclComm(nccl.get_unique_id(), 1, 0, dev)
    stream = torch.cuda.Stream(dev)
    try:
        for n in (1, 4096 + 3, 8 << 20):
            src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=dev)
            dst = torch.zeros(n, dtype=torch.uint8, device=dev)
            with nccl.group():  # a self send alone would wait for its recv forever
                comm.send(src, 0, stream)
                comm.recv(dst, 0, stream)
            comm.wait(stream, timeout_s=30)
            assert torch.equal(src, dst), n
        bf = torch.randn(3, 5, device=dev, dtype=torch.bfloat16)  # any dtype travels as bytes
        out = torch.empty_like(bf)
        with nccl.group():
            comm.send(bf, 0)
            comm.recv(out, 0)
        torch.cuda.synchronize()
        assert torch.equal(bf, out) and comm.async_error() is None
        with pytest.raises(ValueError, match="peer"):
            comm.send(src, 1)
    finally:
        comm.destroy()
    with pytest.raises(nccl.NcclError, match="destroyed"):
        comm.send(torch.zeros(1, dtype=torch.uint8, device=dev), 0)


@pytest.mark.gpu
def test_checksum_kernel_on_gpu_equals_reference():
    from zipserve.compress.wire.checksum import (
        checksum_partials_torch,
        checksum_reference,
        combine_partials,
        device_checksum,
    )
    from zipserve.kernels.checksum import wsum_partials

    for n in (4, 4096 * 5 + 12, 1 << 20, 64 << 20):
        b = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
        want = checksum_partials_torch(b.cpu())
        assert torch.equal(wsum_partials(b).cpu(), want)
        assert torch.equal(checksum_partials_torch(b).cpu(), want)
        assert device_checksum(b) == combine_partials(want)
        if n < 100_000:
            assert combine_partials(want) == checksum_reference(b)
        b[n // 2] ^= 4
        assert device_checksum(b) != combine_partials(want)


@pytest.mark.gpu
def test_link_courier_hands_cuda_buffers_over_on_the_senders_stream():
    """A shaped link hands a CUDA buffer over from its courier thread on the stream that was
    current at send(): the producer's order holds, and CUDA IPC records the event its receiver
    waits on there (not on the default stream behind a whole prefill)."""
    from zipserve.transfer.inprocess import InProcessChannel
    from zipserve.transfer.link import LinkEmulator

    assert _cuda()
    seen = []

    class Recording(InProcessChannel):
        def send(self, buf, tag):
            seen.append(torch.cuda.current_stream())
            super().send(buf, tag)

    a, b = Recording.pair()
    link = LinkEmulator(a, gbps=100.0)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.arange(1 << 18, device="cuda", dtype=torch.int32).view(torch.uint8)  # [1 MiB]
        link.send(x, 1)
    link.flush(timeout=5.0)
    assert seen == [side]
    got = b.recv(1, timeout=5.0)
    torch.cuda.synchronize()
    assert torch.equal(got, x)
    link.close()
