"""Helpers for the tests that drive prefill and decode engines by hand (DisaggregatedEngine): hand
prompts' layers over through the wire encoding, decode to the end, check every page came back;
and for those that drive a prefill and a decode worker: join a pair, serve one request through
them."""

from __future__ import annotations

from zipserve.compress.wire import DeviceLayerKV, LayerKV
from zipserve.decode_worker.worker import DecodeWorker
from zipserve.prefill_worker.worker import PrefillWorker
from zipserve.transfer.inprocess import InProcessChannel


def pool_whole(eng) -> None:
    """Every page and slot back in its pool, nothing reserved."""
    assert eng.pool.num_used == 0 and eng.pool.num_free == eng.pool.capacity, eng.pool.owners()
    assert len(eng.scheduler.free_slots) == eng.engine_config.max_num_seqs
    assert not eng.scheduler.reserved


def as_received(kv, form: str):
    """A sent layer as a receiver gets it: through its bytes (host) or its header (device)."""
    if form == "host":
        return LayerKV.from_bytes(kv.to_bytes())
    return DeviceLayerKV.from_header(kv.header_bytes(), kv.wire.payload)


def hand_over(pre, decs, prompts, params, form: str = "host") -> None:
    """Prefill each prompt once (request ids r0, r1, ...) and hand the same layers to every
    decode engine, which admits the request."""
    for i, prompt in enumerate(prompts):
        rid = f"r{i}"
        for dec in decs:
            dec.reserve(rid, prompt, params)
        res = pre.prefill_export(prompt, params, rid, device_form=form == "device")
        for kv in res.layers:
            for dec in decs:
                dec.import_layer(rid, as_received(kv, form))
        for dec in decs:
            dec.admit(rid, res.first_token, res.first_logprob)


def run_to_completion(eng) -> dict:
    """Step until nothing is left; request id -> its final RequestOutput."""
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return done


def worker_pair(model: str, codec: str, channels=None, **engine_options):
    """A prefill and a decode worker on the CPU, joined by `channels` (the prefill side's, the
    decode side's; an in-process pair by default) as peers "d0" and "p0". Returns both workers
    and the prefill side's channel."""
    a, b = channels if channels is not None else InProcessChannel.pair()
    pre = PrefillWorker(model, codec, "cpu")
    dec = DecodeWorker(model, codec, "cpu", engine_options=engine_options)
    pre.attach("d0", a)
    dec.attach("p0", b)
    return pre, dec, a


def shutdown_pair(pre, dec) -> None:
    """End a worker_pair's threads: the prefill worker's (its senders, its stall monitor, on
    with ZIPSERVE_STEP_TRACE), then the decode worker's."""
    assert pre.shutdown() == []
    dec.shutdown()


def serve_one(pre, dec, rid: str, prompt: list[int], params, decode_id: str = "d0"):
    """Reserve on the decode worker, prefill on the prefill worker (its KV goes to decode_id),
    admit and poll to the end; returns the prefill's report and the last PollReply (the caller
    releases `rid`)."""
    dec.reserve(rid, prompt, params)
    rep = pre.prefill(rid, prompt, params, decode_id)
    res = dec.admit(rid, rep.first_token, rep.first_logprob, timeout=10)
    while not res.finished:
        res = dec.poll(rid, 0, timeout=5)
    return rep, res
