"""Prefill and decode workers in one process over an in-process channel: same tokens as one
engine, KV really crosses the channel compressed, deadlines and corrupt KV free everything."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from disagg_helpers import serve_one, worker_pair

from zipserve.decode_worker.worker import DecodeWorker
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.engine.disaggregated import Overloaded
from zipserve.engine.llm import LLM, SamplingParams
from zipserve.prefill_worker.worker import KV_TAG, PrefillWorker
from zipserve.transfer.inprocess import InProcessChannel

pytestmark = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
MODEL = str(REFERENCE_MODEL)


def _pair(codec: str, **opts):
    return worker_pair(MODEL, codec, **opts)


def _whole(dec: DecodeWorker):
    s = dec.stats()
    assert s.free_pages == s.capacity_pages and s.reserved == 0 and s.running == 0


@pytest.mark.parametrize("codec", ["bf16", "hack2", "kivi4"])
def test_workers_equal_one_engine(codec):
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompts = [list(range(3, 520)), list(range(700, 720))]
    want = [o.token_ids for o in LLM(MODEL, device="cpu", codec=codec).generate(prompts, params)]
    pre, dec, _ = _pair(codec)
    try:
        for i, prompt in enumerate(prompts):
            rep, res = serve_one(pre, dec, f"q{i}", prompt, params)
            assert res.tokens == want[i] and res.finish_reason == "length"
            assert 0 < rep.bytes_sent
            if codec != "bf16" and i == 0:
                assert rep.bytes_sent < rep.dense_bytes / 3  # compressed on the wire
            for k in ("reserved", "kv_complete", "admitted", "finished"):
                assert k in res.times
            dec.release(f"q{i}")
        _whole(dec)
    finally:
        dec.shutdown()


def test_deadline_frees_reservation():
    pre, dec, _ = _pair("hack2")
    try:
        dec.reserve("late", list(range(3, 100)), SamplingParams(max_tokens=5), deadline_s=0.3)
        time.sleep(0.6)
        res = dec.poll("late", 0, timeout=1)
        assert res.finished and res.finish_reason == "error"
        assert "deadline" in res.error
        dec.release("late")
        _whole(dec)
    finally:
        dec.shutdown()


def test_corrupt_kv_fails_request_and_frees():
    pre, dec, chan = _pair("hack2")
    try:
        dec.reserve("bad", list(range(3, 140)), SamplingParams(max_tokens=5))
        chan.send(b"not a layer at all", KV_TAG)  # garbage is dropped by the receiver...
        from zipserve.compress.wire import PAGES, LayerKV

        kv = LayerKV(0, 137, PAGES + b"\x00" * 8, {}, "bad")  # pages cut short
        chan.send(kv.to_bytes(), KV_TAG)  # ...a broken layer for a live request fails it
        res = dec.admit("bad", 1, None, timeout=2)
        assert dec.stats().dropped_messages == 1
        assert res.finished and res.finish_reason == "error" and "rejected" in res.error
        dec.release("bad")
        _whole(dec)
    finally:
        dec.shutdown()


def test_overload_is_refused_not_queued():
    pre, dec, _ = _pair("hack2", num_pages=4)
    try:
        with pytest.raises(Overloaded):
            dec.reserve("big", list(range(3, 400)), SamplingParams(max_tokens=5))
        _whole(dec)
    finally:
        dec.shutdown()


def test_layers_arrive_while_prefill_is_still_running():
    """The decode side holds layer 0 before the prefill worker's forward pass has finished."""
    import threading

    from zipserve.compress.wire import LayerKV

    a, b = InProcessChannel.pair()
    pre = PrefillWorker(MODEL, "hack2", "cpu")
    pre.attach("d0", a)
    arrivals: list[tuple[int, float]] = []

    def receive():
        for _ in range(6):
            kv = LayerKV.from_bytes(b.recv(KV_TAG, timeout=30).numpy().tobytes())
            arrivals.append((kv.layer, time.time()))

    t = threading.Thread(target=receive)
    t.start()
    rep = pre.prefill("ov", list(range(3, 1500)), SamplingParams(max_tokens=2), "d0")
    t.join(timeout=30)
    assert [layer for layer, _ in arrivals] == list(range(6))
    assert arrivals[0][1] < rep.prefill_end  # layer 0 was in before the forward pass ended
    assert arrivals[-1][1] <= rep.send_end + 0.05


def test_next_prompt_computes_while_the_previous_kv_is_on_the_link():
    """Over a slow link the second prompt's forward pass runs while the first prompt's KV is
    still crossing (the link stays busy instead of idling through every prefill), every layer of
    the first prompt arrives before any of the second, and a third prompt waits for a KV slot."""
    from zipserve.compress.wire import LayerKV
    from zipserve.transfer.link import LinkEmulator

    a, b = InProcessChannel.pair()
    pre = PrefillWorker(MODEL, "bf16", "cpu")
    pre.attach("d0", LinkEmulator(a, gbps=0.05))  # ~0.5 s per 400-token prompt's KV
    arrivals: list[tuple[str, int]] = []

    def receive():
        for _ in range(3 * 6):
            kv = LayerKV.from_bytes(b.recv(KV_TAG, timeout=60).numpy().tobytes())
            arrivals.append((kv.request_id, kv.layer))

    rx = threading.Thread(target=receive)
    rx.start()
    params = SamplingParams(max_tokens=2)
    reports: dict[str, object] = {}

    def run(rid: str, delay: float):
        time.sleep(delay)
        reports[rid] = pre.prefill(rid, list(range(3, 400)), params, "d0")

    threads = [
        threading.Thread(target=run, args=(rid, 0.05 * i))
        for i, rid in enumerate(("r0", "r1", "r2"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    rx.join(timeout=60)
    r0, r1, r2 = (reports[k] for k in ("r0", "r1", "r2"))
    assert r1.prefill_start < r0.send_end  # computed while r0's KV was on the link
    assert r1.send_end > r0.send_end and r2.send_end > r1.send_end
    assert r2.prefill_start >= r0.send_end - 0.01  # a third prompt waited for r0's slot
    assert arrivals == [(rid, layer) for rid in ("r0", "r1", "r2") for layer in range(6)]
    assert all(r.bytes_sent > 0 for r in (r0, r1, r2))


def test_a_failed_hand_off_on_a_shaped_link_fails_its_prompt():
    """A shaped link hands layers over after their sends returned; a hand-off that fails (here
    the prompt's last layer's, after every send had returned) is still that prompt's error:
    prefill raises it instead of reporting the KV sent, and the prefill worker keeps none of the
    prompt's pages."""
    from zipserve.transfer.channel import TransferClosed
    from zipserve.transfer.link import LinkEmulator

    pre = PrefillWorker(MODEL, "bf16", "cpu")
    layers = pre.engine.config.num_kv_layers

    class FailsTheLast(InProcessChannel):
        handed = 0

        def send(self, buf, tag):
            type(self).handed += 1
            if type(self).handed == layers:
                raise TransferClosed("the transport closed under the last layer")
            super().send(buf, tag)

    a, _ = FailsTheLast.pair()
    pre.attach("d0", LinkEmulator(a, gbps=0.05))
    with pytest.raises(TransferClosed, match="last layer"):
        pre.prefill("r0", list(range(3, 100)), SamplingParams(max_tokens=2), "d0")
    assert FailsTheLast.handed == layers
    assert pre.stats().used_pages == 0


def test_reshaping_the_link_reports_a_failed_hand_off_naming_its_peer():
    """set_link detaches the old shaping; a hand-off that failed unreported is raised (naming
    the peer), and every channel is re-shaped all the same: the next shaping is in place."""
    from zipserve.transfer.link import LinkEmulator

    pre = PrefillWorker(MODEL, "bf16", "cpu")
    a, _ = InProcessChannel.pair()
    c, _ = InProcessChannel.pair()
    pre.attach("d0", LinkEmulator(a, gbps=1.0))
    pre.attach("d1", LinkEmulator(c, gbps=1.0))
    a.close()
    pre.channels["d0"].send(b"lost", 1)
    with pytest.raises(RuntimeError, match="KV link to d0"):
        pre.set_link(2.0)
    assert all(isinstance(ch, LinkEmulator) and ch.gbps == 2.0 for ch in pre.channels.values())


def test_a_layer_whose_checksum_is_still_on_the_gpu_waits_without_holding_up_the_rest(
    monkeypatch,
):
    """The receive thread queues each device layer's checksum without waiting for it; the step
    loop imports the layers whose checksum is done and keeps the others, in order, for a later
    pass: the request completes once its last layer settles, and its pages return."""
    import zipserve.decode_worker.worker as worker_module

    held = {"hold": True}
    real = worker_module.settled
    monkeypatch.setattr(
        worker_module,
        "settled",
        lambda kv: real(kv) and not (held["hold"] and kv.layer == 0),
    )
    pre, dec, _ = _pair("bf16")
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    prompt = list(range(3, 100))
    try:
        dec.reserve("r", prompt, params)
        rep = pre.prefill("r", prompt, params, "d0")
        deadline = time.time() + 10
        while dec.requests["r"].layers < dec.num_layers - 1 and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # several passes of the step loop
        st = dec.requests["r"]
        assert st.layers == dec.num_layers - 1 and not st.arrived.is_set()
        assert len(dec._arrivals) == 1 and dec._arrivals[0].kv.layer == 0
        held["hold"] = False
        res = dec.admit("r", rep.first_token, rep.first_logprob, timeout=10)
        while not res.finished:
            res = dec.poll("r", 0, timeout=5)
        assert res.error is None and len(res.tokens) == 3
        dec.release("r")
        assert dec.stats().used_pages == 0
    finally:
        dec.shutdown()


def _new_beside_busy(pre, dec):
    """A long-running request ("busy") decoding, then a new one ("new", 297 tokens) prefilled and
    admitted beside it; returns the new one's PrefillReply and admission."""
    busy = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    dec.reserve("busy", list(range(3, 40)), busy)
    rep = pre.prefill("busy", list(range(3, 40)), busy, "d0")
    dec.admit("busy", rep.first_token, rep.first_logprob, timeout=10)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    dec.reserve("new", list(range(3, 300)), params)
    rep = pre.prefill("new", list(range(3, 300)), params, "d0")
    return rep, dec.admit("new", rep.first_token, rep.first_logprob, timeout=10)


def _end_busy_and_new(dec):
    """Abort "busy", let "new" finish its 2 tokens, release both: every page back."""
    dec.abort("busy")
    while not (res := dec.poll("new", 0, timeout=5)).finished:
        pass
    assert res.error is None and len(res.tokens) == 2
    for rid in ("busy", "new"):
        dec.release(rid)
    deadline = time.time() + 5
    while dec.stats().running and time.time() < deadline:
        time.sleep(0.05)
    _whole(dec)


def test_layers_are_imported_between_steps_not_one_per_step():
    """While the decode worker is busy with a slow decode step, a new request's layers wait for
    the step loop, which writes every waiting layer before its next step: the whole KV is in
    about one step after the last layer left, not one step per layer (the transfer phase took
    seconds under load when each layer contended for the worker lock on its own)."""
    step_s = 0.2
    pre, dec, _ = _pair("hack2")
    launch = dec.engine.launch_step

    def slow_launch():  # the host busy for the whole step (on a CPU it is)
        time.sleep(step_s)
        return launch()

    dec.engine.launch_step = slow_launch
    importers: list[str] = []
    import_layer = dec.engine.import_layer

    def recording_import(rid, kv):
        importers.append(threading.current_thread().name)
        return import_layer(rid, kv)

    dec.engine.import_layer = recording_import
    try:
        rep, res = _new_beside_busy(pre, dec)
        assert dec.num_layers == 6
        waited = res.times["kv_complete"] - rep.send_end
        assert waited < 2.5 * step_s, f"the KV took {waited:.2f} s after the last layer left"
        assert importers == ["decode-steps"] * 12  # both requests' 6 layers, by the step loop
        _end_busy_and_new(dec)
    finally:
        dec.shutdown()


@pytest.mark.parametrize("during", ["1", "0"])
def test_layers_arriving_while_the_gpu_runs_a_step_are_imported_then(monkeypatch, during):
    """On a GPU the step loop queues a step, then waits for its tokens: layers that arrive in
    that wait are imported in it (their copies queue behind the step) and a request's KV is in
    within a poll interval of its last layer, not at the end of the step (ZIPSERVE_IMPORT_
    DURING_STEP=0: between steps only, as before). Here a step's device time is simulated: its
    tokens are 'ready' step_s after the launch."""
    monkeypatch.setenv("ZIPSERVE_IMPORT_DURING_STEP", during)
    step_s = 0.3
    pre, dec, _ = _pair("hack2")
    launch, finish = dec.engine.launch_step, dec.engine.finish_step
    running = threading.Event()  # between a launch and its finish

    def gpu_launch():
        launched = launch()
        if launched is not None:
            end = time.time() + step_s
            launched.done = lambda: time.time() >= end
            running.set()
        return launched

    def gpu_finish(launched):
        while not launched.done():  # the host waits for the tokens
            time.sleep(0.001)
        running.clear()
        return finish(launched)

    dec.engine.launch_step, dec.engine.finish_step = gpu_launch, gpu_finish
    in_step: list[bool] = []
    import_layer = dec.engine.import_layer

    def recording_import(rid, kv):
        if rid == "new":
            in_step.append(running.is_set())
        return import_layer(rid, kv)

    dec.engine.import_layer = recording_import
    try:
        rep, res = _new_beside_busy(pre, dec)
        waited = res.times["kv_complete"] - rep.send_end
        assert len(in_step) == dec.num_layers
        if during == "1":
            assert any(in_step), in_step  # (one that came between two steps goes in before)
            assert waited < step_s / 3, f"the KV took {waited:.3f} s after the last layer left"
        else:
            assert not any(in_step), in_step
        _end_busy_and_new(dec)
    finally:
        dec.shutdown()


def test_import_during_step_switch_rejects_other_values():
    from zipserve.decode_worker.arrivals import IMPORT_DURING_STEP_ENV, import_during_step

    assert import_during_step("") and import_during_step("1") and not import_during_step("0")
    with pytest.raises(ValueError, match=IMPORT_DURING_STEP_ENV):
        import_during_step("yes")


def test_prefill_warm_up_runs_the_longest_prompt_and_returns_its_pages():
    pre = PrefillWorker(MODEL, "hack2", "cpu")
    pool = pre.engine.pool
    warm = pre.engine.warm_up_prefill(10**9, device_form=True, held=2)
    assert warm.tokens == min(pre.engine.max_model_len - 1, (pool.capacity - 1) * 64)
    assert warm.kv_bytes > 0 and pool.num_used == 0


def test_prefill_out_of_memory_retries_once_then_refuses_as_overloaded():
    import torch

    pre, dec, _ = _pair("hack2")
    real, calls = pre.engine.prefill_export, []

    def failing(*args, fail_times, **kw):
        calls.append(1)
        if len(calls) <= fail_times:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(*args, **kw)

    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    try:
        pre.engine.prefill_export = lambda *a, **kw: failing(*a, fail_times=1, **kw)
        rep, res = serve_one(pre, dec, "once", list(range(3, 200)), params)
        assert res.finish_reason == "length" and len(calls) == 2
        dec.release("once")
        calls.clear()
        pre.engine.prefill_export = lambda *a, **kw: failing(*a, fail_times=2, **kw)
        dec.reserve("twice", list(range(3, 200)), params)
        with pytest.raises(Overloaded, match="out of GPU memory"):
            pre.prefill("twice", list(range(3, 200)), params, "d0")
        assert pre.stats().out_of_memory == 3
        dec.abort("twice")
        dec.release("twice")
        assert pre.engine.pool.num_used == 0
        _whole(dec)
    finally:
        dec.shutdown()


def test_prefill_shutdown_stops_its_threads_and_closes_its_channels():
    """After a prompt, shutdown leaves no sender thread running and closes the channel (a send
    on it raises); the decode side's end still holds every layer that was sent."""
    from zipserve.transfer.channel import TransferClosed

    a, b = InProcessChannel.pair()
    pre = PrefillWorker(MODEL, "hack2", "cpu")
    pre.attach("d0", a)
    rep = pre.prefill("r0", list(range(3, 200)), SamplingParams(max_tokens=2), "d0")
    sender = pre._senders["d0"]._thread
    assert sender.is_alive()
    assert pre.shutdown(timeout=5) == []
    assert not sender.is_alive()
    assert pre.channels == {}
    with pytest.raises(TransferClosed):
        a.send(torch.zeros(4, dtype=torch.uint8), KV_TAG)
    layers = [b.recv(KV_TAG, timeout=5) for _ in range(pre.engine.config.num_kv_layers)]
    assert sum(m.numel() for m in layers) == rep.bytes_sent
