"""The device-resident KV path, everything a CPU can check: the device checksum against its
word-by-word definition, the device wire form (round trip, same bytes as the host form, corruption
refused), the automatic choice of form and transfer path, workers forced onto the device form
(same tokens as one engine; a corrupted payload fails the request and frees its pages), and the
CUDA-IPC channel's bookkeeping (acks, bounded waits, peer death) with fake IPC handles."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
import torch
from disagg_helpers import serve_one, shutdown_pair, worker_pair

from zipserve.compress.codecs import make_codec
from zipserve.compress.wire import (
    DEVICE_HEADER,
    WireError,
    adopt_pages,
    pack_device,
    pack_pages,
    unpack_device,
    unpack_pages,
)
from zipserve.compress.wire import checksum as ck
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.transfer.channel import TransferClosed, TransferError, TransferTimeout
from zipserve.transfer.cuda_ipc import CudaIpcChannel
from zipserve.transfer.inprocess import InProcessChannel
from zipserve.transfer.kv_messages import recv_layer, send_layer, use_device_form
from zipserve.transfer.link import LinkEmulator
from zipserve.transfer.select import Endpoint
from zipserve.transfer.transports import choose_path

MODEL = str(REFERENCE_MODEL)
needs_model = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)


# -- checksum ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 3, 4, 7, 4095, 4096, 4097, 3 * 4096 + 17, 9 * 4096])
def test_checksum_equals_reference(n, monkeypatch):
    monkeypatch.setattr(ck, "SLAB_ROWS", 2)  # several slabs even for small buffers
    b = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    assert ck.device_checksum(b) == ck.checksum_reference(b)
    assert ck.combine_partials(ck.checksum_partials_torch(b, 3)) == ck.checksum_reference(b)
    if n > 4:  # an unaligned view is handled too
        assert ck.device_checksum(b[1:]) == ck.checksum_reference(b[1:])


def test_checksum_catches_flips_swaps_and_truncation():
    g = torch.Generator().manual_seed(0)
    b = torch.randint(0, 256, (5 * 4096 + 12,), dtype=torch.uint8, generator=g)
    base = ck.device_checksum(b)
    for pos in (0, 4095, 4096 * 3 + 1, b.numel() - 1):
        for bit in (0, 7):
            c = b.clone()
            c[pos] ^= 1 << bit
            assert ck.device_checksum(c) != base
    w = b.view(torch.int32).clone()
    w[[5, 4000]] = w[[4000, 5]]  # two words swapped
    assert w[5] != w[4000] and ck.device_checksum(w.view(torch.uint8)) != base
    assert ck.device_checksum(b[:-4]) != base or not b[-4:].any()
    fp = torch.randn(1000, dtype=torch.bfloat16, generator=g)
    assert ck.device_checksum(fp) == ck.checksum_reference(fp)


# -- device wire form ----------------------------------------------------------------------------
def _filled(codec_name: str, pages: int = 6):
    c = make_codec(
        codec_name, num_kv_heads=2, page_size=64, head_dim=64, model_dir=str(REFERENCE_MODEL)
    ).for_layer(0)
    store = c.new_store(pages, "cpu")
    g = torch.Generator().manual_seed(1)
    c.encode(
        store,
        torch.tensor([1, 2, 4]),
        torch.randn(3, 2, 64, 64, generator=g),
        torch.randn(3, 2, 64, 64, generator=g),
    )
    return c, store


@pytest.mark.parametrize("codec", ["fp8", "kivi2", "hack2", "hack4"])
def test_device_wire_round_trip_equals_host_form(codec):
    c, src = _filled(codec)
    ids = torch.tensor([4, 1, 2])
    tail = {"open_k": torch.randn(2, 5, 64).to(torch.bfloat16), "open_v": torch.randn(2, 0, 64)}
    dw = pack_device(codec, src, ids, extras=tail)
    header = dict(dw.finalize())
    assert header["codec"] == codec and header["layout_version"] == 1
    assert header["num_pages"] == 3 and header["nbytes"] == dw.payload.numel()
    assert all(f["offset"] % 16 == 0 for f in header["fields"] + header["extras"])
    pages, extras = unpack_device(header, dw.payload)
    host = unpack_pages(pack_pages(codec, src, ids))
    for name, t in host.tensors.items():  # bit for bit the host form's bytes
        assert torch.equal(pages.tensors[name].view(torch.uint8), t.view(torch.uint8))
    assert torch.equal(extras["open_k"], tail["open_k"]) and extras["open_v"].shape == (2, 0, 64)
    dst_a, dst_b = c.new_store(8, "cpu"), c.new_store(8, "cpu")
    adopt_pages(codec, dst_a, torch.tensor([7, 0, 3]), pages)
    adopt_pages(codec, dst_b, torch.tensor([7, 0, 3]), host)
    for name in dst_a:
        assert torch.equal(dst_a[name].view(torch.uint8), dst_b[name].view(torch.uint8))


def test_device_wire_refuses_corruption_and_bad_headers():
    _, src = _filled("hack2")
    dw = pack_device("hack2", src, torch.tensor([1, 2]))
    header = dict(dw.finalize())
    bad = dw.payload.clone()
    bad[bad.numel() // 2] ^= 0x10
    with pytest.raises(WireError, match="checksum mismatch"):
        unpack_device(header, bad)
    with pytest.raises(WireError, match="layout version"):
        unpack_device({**header, "layout_version": 99}, dw.payload)
    with pytest.raises(WireError, match="bytes"):
        unpack_device(header, dw.payload[:-16])
    with pytest.raises(WireError, match="checksum"):
        unpack_device({**header, "checksum": None}, dw.payload)


# -- automatic choices ---------------------------------------------------------------------------
class _HostOnly(InProcessChannel):
    carries_device_tensors = False  # like gloo


def test_form_selection():
    a, b = InProcessChannel.pair()
    h, _ = _HostOnly.pair()
    assert use_device_form(a, "cuda:0") and use_device_form(LinkEmulator(a, gbps=10), "cuda")
    assert not use_device_form(a, "cpu")  # CPU stays on host bytes
    assert not use_device_form(h, "cuda:0") and not use_device_form(LinkEmulator(h), "cuda")


def _ep(device="cuda", uuid="GPU-a", host="h1", pid=1, nccl=True, request="auto"):
    return Endpoint(device, uuid if device == "cuda" else "", host, pid, nccl, request)


@pytest.mark.parametrize(
    "a, b, want",
    [
        (_ep("cpu"), _ep("cpu", pid=2), "host"),
        (_ep("cpu"), _ep(pid=2), "host"),
        (_ep(), _ep(pid=2), "cuda_ipc"),  # same GPU, two processes
        (_ep(), _ep(uuid="GPU-b", pid=2), "nccl"),  # two GPUs
        (_ep(), _ep(host="h2"), "nccl"),  # two hosts
        (_ep(), _ep(uuid="GPU-b", pid=2, nccl=False), "host"),  # no NCCL on one side
        (_ep(), _ep(), "host"),  # one process: pairs use InProcessChannel, not this
        (_ep(request="host"), _ep(pid=2), "host"),
        (_ep(request="nccl"), _ep(uuid="GPU-b", pid=2, request="nccl"), "nccl"),
    ],
)
def test_path_choice_is_symmetric(a, b, want):
    assert choose_path(a, b) == choose_path(b, a) == want


@pytest.mark.parametrize(
    "a, b, match",
    [
        (_ep(request="nccl"), _ep(pid=2), "different GPUs"),
        (_ep(request="cuda_ipc"), _ep(uuid="GPU-b", pid=2), "same GPU"),
        (_ep(request="cuda_ipc"), _ep(pid=2, request="nccl"), "different transfer paths"),
    ],
)
def test_forced_impossible_path_is_refused(a, b, match):
    with pytest.raises(TransferError, match=match):
        choose_path(a, b)


# -- workers on the device form (CPU tensors stand in for device ones) ---------------------------
@needs_model
@pytest.mark.parametrize("codec", ["bf16", "hack2"])
def test_workers_on_device_form_equal_one_engine(codec, monkeypatch):
    from zipserve.decode_worker.worker import DecodeWorker
    from zipserve.engine.llm import LLM, SamplingParams
    from zipserve.prefill_worker import worker as pw

    monkeypatch.setattr(pw, "use_device_form", lambda channel, device: True)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompt = list(range(3, 200))
    want = LLM(MODEL, device="cpu", codec=codec).generate([prompt], params)[0].token_ids
    a, b = InProcessChannel.pair()
    seen = []
    send = a.send
    a.send = lambda buf, tag: (seen.append(type(buf).__name__), send(buf, tag))[1]
    pre, dec = pw.PrefillWorker(MODEL, codec, "cpu"), DecodeWorker(MODEL, codec, "cpu")
    pre.attach("d0", a)
    dec.attach("p0", b)
    try:
        dec.reserve("q", prompt, params)
        rep = pre.prefill("q", prompt, params, "d0")
        res = dec.admit("q", rep.first_token, rep.first_logprob, timeout=10)
        while not res.finished:
            res = dec.poll("q", 0, timeout=5)
        assert res.tokens == want and res.error is None
        n_layers = dec.num_layers
        assert seen == ["bytes", "Tensor"] * n_layers  # header + device payload per layer
        dec.release("q")
        # a payload corrupted in transit: the request fails clearly, its pages come back
        a.send = lambda buf, tag: send(_flip(buf) if isinstance(buf, torch.Tensor) else buf, tag)
        dec.reserve("bad", prompt, params)
        rep = pre.prefill("bad", prompt, params, "d0")
        res = dec.admit("bad", rep.first_token, None, timeout=10)
        assert res.finish_reason == "error" and "checksum mismatch" in res.error
        dec.release("bad")
        s = dec.stats()
        assert s.free_pages == s.capacity_pages and s.reserved == 0
        assert pre.stats().used_pages == 0
    finally:
        dec.shutdown()


def _flip(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[t.numel() // 3] ^= 0x01
    return t


@needs_model
def test_send_recv_layer_both_forms():
    from zipserve.compress.wire import DeviceLayerKV, LayerKV
    from zipserve.engine.disaggregated import DisaggregatedEngine
    from zipserve.engine.sampling_params import SamplingParams

    eng = DisaggregatedEngine(MODEL, device="cpu")
    got = {}
    for form in (False, True):
        layers = []
        eng.prefill_export(
            list(range(3, 90)),
            SamplingParams(max_tokens=1),
            f"r{form}",
            on_layer=layers.append,
            device_form=form,
        )
        a, b = InProcessChannel.pair()
        nbytes = send_layer(a, layers[1], 5)
        kv = recv_layer(b, 5, timeout=1)
        assert isinstance(kv, DeviceLayerKV if form else LayerKV) and nbytes > 0
        assert kv.layer == 1 and kv.num_tokens == 87 and kv.request_id == f"r{form}"
        got[form] = kv
    host = unpack_pages(got[False].pages).tensors
    dev, _ = unpack_device(got[True].wire.header, got[True].wire.payload)
    for k in host:  # dense pages [n_pages, KVH, P, D]: tokens past 87 are stale rows
        h, d = (x.transpose(1, 2).flatten(0, 1)[:87] for x in (host[k], dev.tensors[k]))
        assert torch.equal(h, d), k
    a, b = InProcessChannel.pair()
    a.send(DEVICE_HEADER + b"{}", 5)  # a device header with no payload behind it
    with pytest.raises(ValueError, match="without its payload"):
        recv_layer(b, 5, timeout=1, payload_timeout=0.05)
    assert eng.pool.num_used == 0


@needs_model
def test_received_device_layer_queues_its_checksum_and_settles():
    """recv_layer queues a device layer's checksum (start_verify) instead of waiting for it;
    off CUDA that check runs at once, so the layer is settled, and a payload changed on the way
    is caught by the check import_layer makes (ChecksumError)."""
    from zipserve.compress.wire import ChecksumError, DeviceLayerKV
    from zipserve.engine.disaggregated import DisaggregatedEngine
    from zipserve.engine.sampling_params import SamplingParams
    from zipserve.transfer.kv_messages import settled

    eng = DisaggregatedEngine(MODEL, device="cpu")
    layers = []
    eng.prefill_export(
        list(range(3, 90)),
        SamplingParams(max_tokens=1),
        "r",
        on_layer=layers.append,
        device_form=True,
    )
    a, b = InProcessChannel.pair()
    send_layer(a, layers[0], 5)
    kv = recv_layer(b, 5, timeout=1)
    assert kv.checked and settled(kv) and kv.verify()
    bad = DeviceLayerKV.from_header(layers[1].header_bytes(), _flip(layers[1].wire.payload))
    assert not bad.settled()  # nothing queued yet
    bad.start_verify()
    assert bad.settled() and not bad.verify()
    with pytest.raises(ChecksumError):
        bad.check()
    assert eng.pool.num_used == 0


# -- CUDA-IPC bookkeeping with fake handles ------------------------------------------------------
class _FakeIpc:
    """Stands in for cudaIpc*: 'exports' a tensor by key, 'maps' it back by key."""

    def __init__(self):
        self.shared: dict[int, torch.Tensor] = {}
        self.mapped = 0

    def export(self, t):
        key = len(self.shared)
        self.shared[key] = t
        return {"key": key}

    def open(self, h, *device):
        self.mapped += 1
        return self.shared[h["key"]]


class _SlowFakeIpc(_FakeIpc):
    """Mapping takes map_s (5 ms by default), exporting 2 ms."""

    def __init__(self, map_s: float = 0.005):
        super().__init__()
        self.map_s = map_s

    def export(self, t):
        time.sleep(0.002)
        return super().export(t)

    def open(self, h, *device):
        time.sleep(self.map_s)
        return super().open(h, *device)


def _ipc_pair(fake: _FakeIpc | None = None, **kw):
    ca, cb = InProcessChannel.pair()
    fake = fake or _FakeIpc()
    opts = dict(exporter=fake.export, importer=fake.open, inline_cpu=False, **kw)
    return CudaIpcChannel(ca, **opts), CudaIpcChannel(cb, **opts), fake


def test_ipc_acks_free_the_senders_buffers():
    a, b, fake = _ipc_pair(ack_timeout_s=5)
    try:
        bufs = [torch.full((1000,), i, dtype=torch.uint8) for i in range(3)]
        for t in bufs:
            a.send(t, 7)
        a.send(b"inline bytes", 7)
        assert a.inflight == 3
        leases = [b.recv_lease(7, timeout=1) for _ in range(3)]
        assert [int(ls.tensor[0]) for ls in leases] == [0, 1, 2] and b.open_leases == 3
        assert bytes(b.recv_lease(7, timeout=1).tensor.numpy()) == b"inline bytes"
        assert a.inflight == 3  # nothing is given back while mapped
        leases[1].release()
        leases[1].release()  # idempotent
        assert _until(lambda: a.inflight == 2)
        copy = None
        a.send(torch.arange(10, dtype=torch.uint8), 8)
        copy = b.recv(8, timeout=1)  # recv() copies and gives back at once
        assert torch.equal(copy, torch.arange(10, dtype=torch.uint8))
        for ls in leases:
            ls.release()
        assert a.wait_acked(2.0) and a.inflight == 0 and b.open_leases == 0
        assert a.bytes_sent == 3000 + 12 + 10 and fake.mapped == 4
    finally:
        a.close()
        b.close()


def test_deferred_acks_go_back_as_one_message_per_channel_when_the_block_ends():
    """Leases released inside a DeferredAcks block are acknowledged together at its end: the
    sender keeps every buffer until then, then frees all of them from one control message."""
    from zipserve.transfer.cuda_ipc import ACK_TAG, DeferredAcks

    a, b, _ = _ipc_pair(ack_timeout_s=5)
    acks_sent = []
    send = b.control.send
    b.control.send = lambda buf, tag: (acks_sent.append(tag == ACK_TAG), send(buf, tag))
    try:
        for i in range(4):
            a.send(torch.full((100,), i, dtype=torch.uint8), 7)
        leases = [b.recv_lease(7, timeout=1) for _ in range(4)]
        with DeferredAcks() as deferred:
            for ls in leases[:3]:
                ls.release()
            time.sleep(0.1)
            assert a.inflight == 4 and b.open_leases == 1  # released, not yet acknowledged
            with pytest.raises(RuntimeError, match="nest"), DeferredAcks():
                pass
        assert _until(lambda: a.inflight == 1) and acks_sent.count(True) == 1
        assert deferred.send_ms >= 0
        leases[3].release()  # outside a block: acknowledged at once, alone
        assert a.wait_acked(2.0) and acks_sent.count(True) == 2
    finally:
        a.close()
        b.close()


class _SegmentedFakeIpc(_FakeIpc):
    """Exports name the tensor's 'segment' (its first byte's value, as torch names a CUDA
    allocation segment by one handle); the receiver's mappings are tracked by weak references
    to what it was handed, the way torch unmaps a segment when its last tensor dies."""

    def __init__(self):
        super().__init__()
        self.alive: list = []

    def export(self, t):
        return {**super().export(t), "handle": f"segment-{int(t[0])}"}

    def open(self, h, *device):
        t = super().open(h, *device).clone()  # a tensor of its own, as a mapping is
        self.alive.append(weakref.ref(t))
        return t

    def held(self) -> int:
        return sum(r() is not None for r in self.alive)


def test_keep_mapped_holds_the_latest_tensor_of_each_segment_after_its_give_back():
    """keep_mapped: each lease still goes back (acknowledged, the sender's buffer freed), but the
    receiver keeps the last tensor of each segment, so the segment stays mapped; a later tensor
    of the segment replaces it, and close() lets every kept one go. Off: nothing is kept."""
    for keep in (True, False):
        a, b, fake = _ipc_pair(_SegmentedFakeIpc(), ack_timeout_s=5, keep_mapped=keep)
        try:
            for seg in (1, 1, 2, 1):
                a.send(torch.full((64,), seg, dtype=torch.uint8), 7)
                b.recv_lease(7, timeout=1).release()
            assert a.wait_acked(2.0) and a.inflight == 0 and b.open_leases == 0
            gc.collect()
            assert b.kept_segments == fake.held() == (2 if keep else 0)  # segments 1 and 2
        finally:
            a.close()
            b.close()
        gc.collect()
        assert b.kept_segments == fake.held() == 0


@pytest.mark.parametrize("bound", ["segments", "bytes"])
def test_keep_mapped_lets_the_least_recently_used_segment_go(monkeypatch, bound):
    """At most KEEP_MAPPED_SEGMENTS segments and KEEP_MAPPED_BYTES kept: the least recently
    used goes first; a tensor over the byte bound alone is not kept."""
    from zipserve.transfer import cuda_ipc

    if bound == "segments":
        monkeypatch.setattr(cuda_ipc, "KEEP_MAPPED_SEGMENTS", 2)
    else:
        monkeypatch.setattr(cuda_ipc, "KEEP_MAPPED_BYTES", 16)  # two 8-byte tensors
    a, b, fake = _ipc_pair(_SegmentedFakeIpc(), ack_timeout_s=5, keep_mapped=True)
    try:
        for seg in (1, 2, 1, 3):  # 2 is the least recently used when 3 comes
            a.send(torch.full((8,), seg, dtype=torch.uint8), 7)
            b.recv_lease(7, timeout=1).release()
        gc.collect()
        assert b.kept_segments == fake.held() == 2
        assert sorted(int(t[0]) for t in b._mapped.values()) == [1, 3]
        if bound == "bytes":
            a.send(torch.full((32,), 4, dtype=torch.uint8), 7)  # over the bound by itself
            b.recv_lease(7, timeout=1).release()
            gc.collect()
            assert b.kept_segments == fake.held() == 0
    finally:
        a.close()
        b.close()


@needs_model
def test_decode_worker_gives_every_ipc_layer_back_after_importing_it(monkeypatch):
    """Served over CUDA IPC (fake handles, CPU, the device form forced), the decode worker
    imports each mapped layer and gives it back from its returner thread: the sender ends with
    nothing in flight, the receiver with no open lease, and the pages of both go back."""
    import zipserve.prefill_worker.worker as prefill_module
    from zipserve.engine.sampling_params import SamplingParams

    monkeypatch.setattr(
        prefill_module, "use_device_form", lambda ch, dev: ch.carries_device_tensors
    )
    a, b, fake = _ipc_pair(ack_timeout_s=10)
    pre, dec, _ = worker_pair(MODEL, "hack2", channels=(a, b))
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    prompt = list(range(3, 120))
    try:
        _, res = serve_one(pre, dec, "r", prompt, params)
        assert res.error is None and len(res.tokens) == 3
        assert fake.mapped == dec.num_layers
        assert a.wait_acked(5.0) and a.inflight == 0 and b.open_leases == 0
        dec.release("r")
        assert dec.stats().used_pages == 0 and pre.stats().used_pages == 0
    finally:
        dec.shutdown()
        a.close()
        b.close()


@needs_model
def test_receive_trace_times_each_ipc_layers_mapping(monkeypatch, tmp_path):
    """With ZIPSERVE_STEP_TRACE on, each layer received over CUDA IPC leaves one receive-trace
    row whose mapping time is the importer's (a fake that takes 5 ms), inside its payload time."""
    import zipserve.prefill_worker.worker as prefill_module
    from zipserve.bench.step_gaps import read_receives
    from zipserve.decode_worker.step_trace import ENV
    from zipserve.engine.sampling_params import SamplingParams

    monkeypatch.setenv(ENV, str(tmp_path))
    monkeypatch.setattr(
        prefill_module, "use_device_form", lambda ch, dev: ch.carries_device_tensors
    )
    a, b, _ = _ipc_pair(_SlowFakeIpc(), ack_timeout_s=10)
    pre, dec, _ = worker_pair(MODEL, "hack2", channels=(a, b))
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    try:
        _, res = serve_one(pre, dec, "r", list(range(3, 120)), params)
        assert res.error is None
        dec.release("r")
    finally:
        shutdown_pair(pre, dec)
        a.close()
        b.close()
    (rows,) = read_receives(tmp_path).values()
    assert sorted(int(r["layer"]) for r in rows) == list(range(dec.num_layers))
    assert all(r["map_ms"] >= 5.0 and r["payload_ms"] >= r["map_ms"] for r in rows)
    assert all(r["nbytes"] > 0 and r["verify_ms"] >= 0 and r["idle_ms"] >= 0 for r in rows)
    assert all(0 <= r["checksum_ms"] <= r["verify_ms"] and r["cpu_ms"] >= 0 for r in rows)


@needs_model
def test_send_trace_shows_the_wait_for_acknowledgements(monkeypatch, tmp_path):
    """With CUDA IPC's in-flight limit at one byte every layer's payload waits until the decode
    side gave the previous buffer back (mapping takes 25 ms there: long beside a busy CI
    machine's scheduling delays, which once let every ack arrive before the sender looked, with
    5 ms): the prefill worker's send trace puts that wait in ack_ms, as much as the channel
    counted, and not in send_ms; the handles' export (2 ms each) goes to export_ms."""
    import zipserve.prefill_worker.worker as prefill_module
    from zipserve.bench.step_gaps import read_sends, send_tails
    from zipserve.control.csv_trace import ENV
    from zipserve.engine.sampling_params import SamplingParams

    monkeypatch.setenv(ENV, str(tmp_path))
    monkeypatch.setattr(
        prefill_module, "use_device_form", lambda ch, dev: ch.carries_device_tensors
    )
    a, b, _ = _ipc_pair(_SlowFakeIpc(map_s=0.025), ack_timeout_s=10)
    pre, dec, _ = worker_pair(MODEL, "hack2", channels=(a, b))
    a.limit_inflight(1)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    try:
        _, res = serve_one(pre, dec, "r", list(range(3, 120)), params)
        assert res.error is None
        dec.release("r")
        assert a.wait_acked(5)
    finally:
        shutdown_pair(pre, dec)
        a.close()
        b.close()
    (rows,) = read_sends(tmp_path).values()
    layers = [r for r in rows if r["layer"] >= 0]
    assert len(layers) == dec.num_layers
    assert sum(r["ack_ms"] > 0 for r in layers) >= dec.num_layers // 2
    assert sum(r["ack_ms"] for r in layers) == pytest.approx(
        1e3 * a.ack_wait_s, abs=0.01 * len(layers)
    )
    assert all(r["export_ms"] >= 2.0 for r in layers)  # one payload exported per layer
    assert sum(r["export_ms"] for r in layers) == pytest.approx(
        1e3 * a.export_s, abs=0.01 * len(layers)
    )
    (tail,) = send_tails(rows)
    assert tail["tail_ms"] >= tail["ack_ms"] >= 0


def test_buffer_returns_go_back_in_order_and_past_a_failure(monkeypatch):
    from zipserve.decode_worker import buffer_returns

    seen = []

    def fake_done(kv):
        if kv == "closed":
            raise RuntimeError("the channel closed")
        seen.append(kv)

    monkeypatch.setattr(buffer_returns, "done", fake_done)
    returns = buffer_returns.BufferReturns()
    cpu = torch.device("cpu")
    returns.give_back(["a", "closed", "b"], cpu)
    returns.give_back([], cpu)
    returns.give_back(["c"], cpu)
    returns.close()
    assert seen == ["a", "b", "c"] and returns.failures == 1


def test_ipc_inflight_budget_blocks_then_times_out():
    a, b, _ = _ipc_pair(ack_timeout_s=2.0, max_inflight_bytes=1500)
    try:
        a.send(torch.zeros(1000, dtype=torch.uint8), 1)
        lease = b.recv_lease(1, timeout=1)
        threading.Timer(0.1, lease.release).start()
        t0 = time.monotonic()
        a.send(torch.zeros(1000, dtype=torch.uint8), 1)  # waits for the first ack
        waited = time.monotonic() - t0
        assert 0.05 < waited < 1.8  # released after 0.1 s, well before 2.0 s
        # the wait is reported as such (a link emulator over this channel passes it on)
        window = time.monotonic() - t0 + 0.05
        assert 0.04 < a.ack_wait_fraction(window) * window <= waited + 0.01
        assert 0.04 < a.ack_wait_s <= waited + 0.01  # the running total the send trace reads
        passed_on = LinkEmulator(a, gbps=100.0).usage(window).ack_wait
        assert passed_on == pytest.approx(a.ack_wait_fraction(window), abs=0.05)
        t0, before = time.monotonic(), a.ack_wait_s
        with pytest.raises(TransferTimeout, match="unacknowledged"):
            a.send(torch.zeros(1000, dtype=torch.uint8), 1)  # nobody gives the second back
        assert time.monotonic() - t0 < 4.0
        assert a.ack_wait_s - before >= 1.9  # a wait that timed out counts too
    finally:
        a.close()
        b.close()


def test_ipc_stuck_peer_fails_channel_and_drops_references():
    a, b, _ = _ipc_pair(ack_timeout_s=0.2)
    try:
        t = torch.zeros(100, dtype=torch.uint8)
        a.send(t, 1)
        b.recv_lease(1, timeout=1)  # mapped and never released
        assert _until(lambda: a.inflight == 0, 2.0)  # expired: references dropped
        with pytest.raises(TransferTimeout, match="did not return"):
            a.send(t, 1)
    finally:
        a.close()
        b.close()


def test_ipc_peer_death_releases_and_refuses():
    a, b, _ = _ipc_pair(ack_timeout_s=30)
    a.send(torch.zeros(100, dtype=torch.uint8), 1)
    b.control.close()  # the peer's side of the control path goes away (as on a crash)
    assert _until(lambda: a.inflight == 0, 2.0)
    with pytest.raises(TransferClosed):
        a.send(torch.zeros(100, dtype=torch.uint8), 1)
    a.close()
    b.close()
    with pytest.raises(TransferClosed):
        a.send(b"x", 1)


def test_ipc_close_gives_back_open_leases():
    a, b, _ = _ipc_pair(ack_timeout_s=5)
    a.send(torch.zeros(100, dtype=torch.uint8), 1)
    b.recv_lease(1, timeout=1)
    b.close()  # releases the lease (ACK) before closing the control path
    assert a.wait_acked(2.0) and a.inflight == 0
    a.close()


def _until(cond, timeout: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_transfer_bench_host_channel_on_cpu(tmp_path):
    from zipserve.bench import transfer_bench

    rows = transfer_bench.run(tmp_path, ["host", "cuda_ipc"], max_bytes=16 << 10, device="cpu")
    assert [(r["channel"], r["bytes"]) for r in rows] == [("host", 4096), ("host", 16384)]
    assert all(r["GB_per_s"] > 0 for r in rows)
    assert (tmp_path / "transfer.csv").read_text().count("\n") == 3


@pytest.mark.parametrize("n", [4, 4096, 4096 * 3 + 8, 20000])
def test_triton_checksum_partials_equal_torch_reference(n):
    from zipserve.kernels.checksum import wsum_partials

    g = torch.Generator().manual_seed(n)
    b = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    want = ck.checksum_partials_torch(b)  # [PROGRAMS, 2]
    assert ck.combine_partials(want) == ck.checksum_reference(b)
    assert torch.equal(wsum_partials(b), want)  # Triton interpreter on CPU, bit for bit
    assert torch.equal(wsum_partials(b, 3), ck.checksum_partials_torch(b, 3))  # rows > programs
    odd = b[:-1]  # odd size: the torch path
    assert ck.combine_partials(wsum_partials(odd)) == ck.checksum_reference(odd)
