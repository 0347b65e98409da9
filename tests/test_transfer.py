"""transfer/: channels move tagged byte buffers intact and in order, time out promptly, close
cleanly; two real processes talk over a private gloo group; the link emulator shapes timing."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import traceback
from contextlib import contextmanager

import pytest
import torch
import torch.multiprocessing as mp

from zipserve.transfer.channel import TransferClosed, TransferError, TransferTimeout
from zipserve.transfer.inprocess import InProcessChannel
from zipserve.transfer.link import LinkEmulator, LinkUsage
from zipserve.transfer.ports import free_port

JOIN_S = 60.0
HELLO = {"model": "ref-tiny", "codec": "hack2", "page_size": 64}


# -- in-process ---------------------------------------------------------------------------------
def test_inprocess_round_trip_sizes_tags_and_order():
    a, b = InProcessChannel.pair()
    g = torch.Generator().manual_seed(0)
    big = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=g)
    sent = [(1, b""), (2, b"x"), (1, big), (2, b""), (1, b"y"), (2, big[:1000].clone())]
    for tag, buf in sent:
        a.send(buf, tag)
    # receive tag 2 completely first: tags are independent, order within a tag is kept
    for want_tag in (2, 1):
        for tag, buf in sent:
            if tag != want_tag:
                continue
            got = b.recv(tag, timeout=1.0)
            assert got.dtype == torch.uint8 and got.dim() == 1
            want = (
                buf
                if isinstance(buf, torch.Tensor)
                else torch.frombuffer(bytearray(buf), dtype=torch.uint8)
                if buf
                else torch.empty(0, dtype=torch.uint8)
            )
            assert torch.equal(got, want)
    total = sum(len(x) if isinstance(x, bytes) else x.numel() for _, x in sent)
    assert a.bytes_sent == b.bytes_received == total
    # the other direction, and a non-byte tensor arrives as its bytes
    f = torch.arange(6, dtype=torch.float32).view(2, 3)
    b.send(f, 7)
    assert torch.equal(a.recv(7, timeout=1.0).view(torch.float32), f.reshape(-1))
    a.close()
    b.close()


def test_inprocess_timeout_is_prompt_and_close_is_clean():
    a, b = InProcessChannel.pair()
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout):
        b.recv(3, timeout=0.1)
    assert 0.09 <= time.monotonic() - t0 < 1.0
    a.send(b"late", 3)  # still usable after a timeout
    assert bytes(b.recv(3, timeout=1.0).numpy()) == b"late"

    # a waiting receiver wakes up when the peer closes; queued messages are still delivered
    a.send(b"last", 4)
    threading.Timer(0.1, a.close).start()
    assert bytes(b.recv(4, timeout=1.0).numpy()) == b"last"
    t0 = time.monotonic()
    with pytest.raises(TransferClosed):
        b.recv(4, timeout=5.0)
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(TransferClosed):
        b.send(b"nobody listens", 4)
    with pytest.raises(TransferClosed):
        a.send(b"closed", 4)
    with pytest.raises(TransferError, match="tag"):
        b.recv(-2)
    b.close()
    b.close()  # idempotent


# -- link emulation -----------------------------------------------------------------------------
def test_link_emulator_bandwidth_latency_and_default_off():
    ten_mb = torch.zeros(10_000_000, dtype=torch.uint8)

    a, b = InProcessChannel.pair()
    off = LinkEmulator(a)
    assert not off.enabled
    t0 = time.monotonic()
    off.send(ten_mb, 1)
    assert time.monotonic() - t0 < 0.5  # no 80 ms of shaping (loose: a loaded CI machine)
    assert off.busy_fraction(window_s=10.0) == 0.0
    assert b.recv(1, timeout=1.0).numel() == 10_000_000 and off.bytes_sent == 10_000_000

    # send returns once the slot is reserved; the message arrives when the slot has ended
    link = LinkEmulator(a, gbps=1.0)
    t0 = time.monotonic()
    link.send(ten_mb, 1)  # 8e7 bits at 1e9 bit/s = 80 ms
    assert time.monotonic() - t0 < 0.05
    assert b.recv(1, timeout=1.0).numel() == 10_000_000
    assert 0.075 <= time.monotonic() - t0 < 1.0
    link.flush(timeout=1.0)
    # The link counts the 80 ms it was transmitting within any window that holds the send.
    window = time.monotonic() - t0 + 0.05
    busy_s = link.busy_fraction(window_s=window) * window
    assert abs(busy_s - 0.08) < 0.005, busy_s
    time.sleep(0.15)
    assert link.busy_fraction(window_s=0.1) == 0.0

    # A hand-off to the wrapped channel that takes 60 ms (a slow export) comes after its slot
    # and is counted as hand-off; the next message is on the wire meanwhile: three 80 ms slots
    # with 60 ms hand-offs take ~300 ms to the last hand-over, not the 420 of one after another.
    class SlowInner(InProcessChannel):
        def send(self, buf, tag):
            time.sleep(0.06)
            super().send(buf, tag)

    slow_a, slow_b = SlowInner.pair()
    slow = LinkEmulator(slow_a, gbps=1.0)
    t0 = time.monotonic()
    for _ in range(3):
        slow.send(ten_mb, 1)
    slow.flush(timeout=2.0)
    took = time.monotonic() - t0
    assert 0.295 <= took < 0.38, took
    window = took + 0.05
    usage = slow.usage(window_s=window)
    assert abs(usage.busy * window - 0.24) < 0.01, usage
    assert usage.handoff * window >= 0.175 and usage.handoff < 1.0, usage  # >= 3 x 60 ms
    assert [slow_b.recv(1, timeout=1.0).numel() for _ in range(3)] == [10_000_000] * 3
    assert usage.ack_wait == 0.0  # an in-process channel takes no acknowledgements
    assert LinkUsage.mean([None, usage, LinkUsage(0.0, 0.0, 0.5)]) == LinkUsage(
        usage.busy / 2, usage.handoff / 2, 0.25
    )
    assert LinkUsage.mean([None]) is None

    lat = LinkEmulator(a, latency_ms=50)
    t0 = time.monotonic()
    lat.send(b"x", 2)
    assert b.recv(2, timeout=1.0).numel() == 1
    assert 0.045 <= time.monotonic() - t0 < 0.3
    assert lat.transmit_seconds(10**9) == 0.0

    # concurrent sends queue behind each other on one link: two 5 MB sends take ~80 ms in all
    shared = LinkEmulator(a, gbps=1.0)
    half = ten_mb[:5_000_000]
    t0 = time.monotonic()
    threads = [threading.Thread(target=shared.send, args=(half, 3)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5.0)
    shared.flush(timeout=1.0)
    assert 0.075 <= time.monotonic() - t0 < 0.3
    assert b.recv(3, timeout=1.0).numel() == b.recv(3, timeout=1.0).numel() == 5_000_000
    a.close()


def test_link_emulator_reports_a_failed_hand_off_and_stops_when_detached():
    """A hand-off that raises (the transport closed under it) is raised by the next flush (or
    send), once; a detached emulator hands over what it holds and refuses more, leaving the
    wrapped channel open for a new shaping."""
    a, b = InProcessChannel.pair()
    link = LinkEmulator(a, gbps=1.0)
    link.send(b"first", 1)
    link.flush(timeout=1.0)
    assert b.recv(1, timeout=1.0).numel() == 5
    a.close()
    link.send(b"lost", 1)
    with pytest.raises(TransferClosed):
        link.flush(timeout=1.0)
    link.flush(timeout=1.0)  # reported once

    c, d = InProcessChannel.pair()
    shaped = LinkEmulator(c, gbps=1.0)
    shaped.send(torch.zeros(1_000_000, dtype=torch.uint8), 2)  # 8 ms
    shaped.detach()
    assert d.recv(2, timeout=1.0).numel() == 1_000_000
    with pytest.raises(TransferClosed):
        shaped.send(b"x", 2)
    LinkEmulator(c, gbps=1.0).send(b"again", 2)  # the wrapped channel stayed open
    assert d.recv(2, timeout=1.0).numel() == 5
    c.close()


def test_detaching_a_link_reports_a_hand_off_that_failed_unreported():
    """A hand-off that failed after the last flush is raised by detach (never swallowed), and
    the courier stops all the same: the emulator refuses further sends."""
    a, _b = InProcessChannel.pair()
    link = LinkEmulator(a, gbps=1.0)
    a.close()
    link.send(b"lost", 1)
    with pytest.raises(TransferClosed):
        link.detach()
    with pytest.raises(TransferClosed):
        link.send(b"x", 1)


# -- two real processes over gloo ---------------------------------------------------------------
def _child(role: str, rank: int, port: int, args: dict, results) -> None:
    """Entry of a spawned process: runs one role and reports (rank, 'ok'|'error', value)."""
    try:
        value = globals()[f"_role_{role}"](rank, port, **args)
        results.put((rank, "ok", value))
    except BaseException:  # report everything to the parent
        results.put((rank, "error", traceback.format_exc()))


def _role_sender(rank: int, port: int, messages: list[tuple[int, bytes]]) -> dict:
    from zipserve.transfer.process_group import ProcessGroupChannel

    with ProcessGroupChannel.connect(
        "127.0.0.1", port, rank, HELLO, expect=HELLO, timeout_s=30
    ) as ch:
        for tag, buf in messages:
            ch.send(buf, tag)
        ack = bytes(ch.recv(99, timeout=30).numpy())
        return {"ack": ack, "bytes_sent": ch.bytes_sent}


def _role_receiver(rank: int, port: int, tags: list[int], pages_tag: int) -> dict:
    from zipserve.compress.wire import unpack_pages
    from zipserve.transfer.process_group import ProcessGroupChannel

    with ProcessGroupChannel.connect(
        "127.0.0.1", port, rank, HELLO, expect=HELLO, timeout_s=30
    ) as ch:
        t0 = time.monotonic()
        try:
            ch.recv(12345, timeout=0.2)
            timeout_s = None
        except TransferTimeout:
            timeout_s = time.monotonic() - t0
        got = [(tag, ch.recv(tag, timeout=30)) for tag in tags]
        pages = unpack_pages(bytes(dict(got)[pages_tag].numpy()))
        ch.send(b"ack", 99)
        t0 = time.monotonic()
        try:  # the sender closes after the ack: a pending recv must end with TransferClosed
            ch.recv(1, timeout=20)
            after_close = "got a message"
        except TransferClosed:
            after_close = "closed"
        try:
            ch.send(b"too late", 1)
        except TransferClosed:
            after_close += ", send refused"
        return {
            "timeout_s": timeout_s,
            "closed_after_s": time.monotonic() - t0,
            "after_close": after_close,
            "bytes_received": ch.bytes_received,
            "digests": [
                (tag, len(t), hashlib.sha256(t.numpy().tobytes()).hexdigest()) for tag, t in got
            ],
            "pages": {
                k: v.contiguous().view(torch.uint8).numpy().tobytes()
                for k, v in pages.tensors.items()
            },
            "pages_meta": pages.meta,
            "num_pages": pages.num_pages,
        }


def _role_handshake(rank: int, port: int, hello: dict, expect: dict | None) -> str:
    from zipserve.transfer.process_group import ProcessGroupChannel

    try:
        ProcessGroupChannel.connect(
            "127.0.0.1", port, rank, hello, expect=expect, timeout_s=30
        ).close()
        return "connected"
    except TransferError as e:
        return f"TransferError: {e}"


def _role_dies(rank: int, port: int) -> None:
    from zipserve.transfer.process_group import ProcessGroupChannel

    ProcessGroupChannel("127.0.0.1", port, rank, timeout_s=30)
    time.sleep(0.3)
    os._exit(0)  # no close: as if the process crashed


def _role_survivor(rank: int, port: int) -> str:
    from zipserve.transfer.process_group import ProcessGroupChannel

    ch = ProcessGroupChannel("127.0.0.1", port, rank, timeout_s=30)
    t0 = time.monotonic()
    try:
        ch.recv(5, timeout=20)
        outcome = "got a message"
    except TransferTimeout:
        outcome = "timeout"
    except TransferError as e:
        outcome = f"error {type(e).__name__}"
    dt = time.monotonic() - t0
    ch.close()
    return f"{outcome} after {dt:.1f}s"


@contextmanager
def _two_processes(roles: list[tuple[str, dict]]):
    """Spawn rank 0 and rank 1 with the given roles; yields a function that collects their
    results; every process is joined (then killed) before leaving."""
    ctx = mp.get_context("spawn")
    port, results = free_port(), ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(role, rank, port, args, results), daemon=True)
        for rank, (role, args) in enumerate(roles)
    ]
    for p in procs:
        p.start()

    def collect(expect: int = 2) -> dict[int, object]:
        out = {}
        deadline = time.monotonic() + JOIN_S
        while len(out) < expect:
            rank, status, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            assert status == "ok", f"rank {rank} failed:\n{value}"
            out[rank] = value
        return out

    try:
        yield collect
    finally:
        for p in procs:
            p.join(timeout=JOIN_S)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
        results.join_thread()


def _packed_pages() -> tuple[bytes, dict[str, bytes]]:
    from zipserve.compress.codecs import make_codec
    from zipserve.compress.wire import pack_pages

    codec = make_codec("hack2", 2, 64, 64)
    store = codec.new_store(6, "cpu")
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([1, 2, 4])
    codec.encode(
        store, ids, torch.randn(3, 2, 64, 64, generator=g), torch.randn(3, 2, 64, 64, generator=g)
    )
    sel = torch.tensor([4, 1, 2])
    buf = pack_pages("hack2", store, sel, meta={"request": "r7", "layer": 0})
    return buf, {
        k: v[sel].contiguous().view(torch.uint8).numpy().tobytes() for k, v in store.items()
    }


def test_gloo_channel_between_two_processes():
    g = torch.Generator().manual_seed(1)
    big = torch.randint(0, 256, (4 << 20,), dtype=torch.uint8, generator=g).numpy().tobytes()
    pages_buf, pages_want = _packed_pages()
    messages = [(1, b"hello"), (2, b""), (3, big), (1, b"x" * 1000), (4, pages_buf), (2, b"z")]
    tags = [2, 1, 3, 4, 2, 1]  # a different order than sent: tags are independent
    with _two_processes(
        [("sender", {"messages": messages}), ("receiver", {"tags": tags, "pages_tag": 4})]
    ) as collect:
        res = collect()
    sender, receiver = res[0], res[1]
    assert sender["ack"] == b"ack"
    per_tag = {}
    for tag, buf in messages:
        per_tag.setdefault(tag, []).append(buf)
    want = [
        (tag, len(b), hashlib.sha256(b).hexdigest()) for tag in tags for b in [per_tag[tag].pop(0)]
    ]
    assert receiver["digests"] == want
    assert receiver["bytes_received"] == sender["bytes_sent"] == sum(len(b) for _, b in messages)
    assert receiver["pages"] == pages_want
    assert receiver["num_pages"] == 3 and receiver["pages_meta"] == {"request": "r7", "layer": 0}
    assert receiver["timeout_s"] is not None and 0.19 <= receiver["timeout_s"] < 2.0
    assert receiver["after_close"] == "closed, send refused" and receiver["closed_after_s"] < 10


def test_gloo_handshake_mismatch_names_the_key():
    other = dict(HELLO, codec="hack4")
    with _two_processes(
        [
            ("handshake", {"hello": HELLO, "expect": HELLO}),
            ("handshake", {"hello": other, "expect": None}),
        ]
    ) as collect:
        res = collect()
    assert res[0].startswith("TransferError") and "'codec'" in res[0] and "hack4" in res[0]
    assert res[1].startswith("TransferError") and "refused" in res[1] and "'codec'" in res[1]


def test_gloo_peer_crash_fails_recv_instead_of_hanging():
    with _two_processes([("survivor", {}), ("dies", {})]) as collect:
        res = collect(expect=1)
    outcome = res[0]
    assert outcome.startswith("error"), outcome
    assert float(outcome.split("after ")[1].rstrip("s")) < 10


# -- NCCL ---------------------------------------------------------------------------------------
def test_nccl_module_imports_without_libnccl():
    from zipserve.transfer import nccl

    if nccl.nccl_available():
        pytest.skip("this machine has a libnccl")
    with pytest.raises(nccl.NcclError, match="libnccl"):
        nccl.get_unique_id()
    with pytest.raises(nccl.NcclError):
        nccl.nccl_version()


@pytest.mark.gpu
def test_nccl_binding_loads_with_torch():
    from zipserve.transfer import nccl

    assert nccl.nccl_available()
    assert nccl.nccl_version() >= (2, 18, 0)
    assert len(nccl.get_unique_id()) == nccl.UNIQUE_ID_BYTES


def _role_nccl_comm(rank: int, port: int, uid_box) -> dict:
    from zipserve.transfer import nccl

    if rank == 0:
        uid = nccl.get_unique_id()
        uid_box.put(uid)
    else:
        uid = uid_box.get(timeout=30)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    comm = nccl.NcclComm(uid, 2, rank, device)
    stream = torch.cuda.Stream(device)
    n = 4 << 20
    if rank == 0:
        data = torch.arange(n, device=device, dtype=torch.int64).to(torch.uint8)
        comm.send(data, peer=1, stream=stream)
        stream.synchronize()
        out = {"sent": n}
    else:
        buf = torch.empty(n, dtype=torch.uint8, device=device)
        comm.recv(buf, peer=0, stream=stream)
        stream.synchronize()
        want = torch.arange(n, device=device, dtype=torch.int64).to(torch.uint8)
        out = {"equal": bool(torch.equal(buf, want))}
    comm.destroy()
    return out


def _role_nccl_channel(rank: int, port: int, pages_buf: bytes) -> dict:
    from zipserve.compress.wire import unpack_pages
    from zipserve.transfer.process_group import ProcessGroupChannel

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    with ProcessGroupChannel.connect(
        "127.0.0.1", port, rank, HELLO, expect=HELLO, backend="nccl", device=device, timeout_s=60
    ) as ch:
        if rank == 0:
            ch.send(pages_buf, 4)
            ch.send(torch.ones(1 << 20, dtype=torch.uint8, device=device), 5)
            return {"sent": ch.bytes_sent}
        got = ch.recv(4, timeout=60)
        ones = ch.recv(5, timeout=60)
        return {
            "device": str(got.device),
            "same": bytes(got.cpu().numpy()) == pages_buf,
            "meta": unpack_pages(bytes(got.cpu().numpy())).meta,
            "ones": bool((ones == 1).all()) and ones.numel() == 1 << 20,
        }


@pytest.mark.multi_gpu
def test_nccl_comm_between_two_processes():
    ctx = mp.get_context("spawn")
    uid_box = ctx.Queue()
    with _two_processes(
        [("nccl_comm", {"uid_box": uid_box}), ("nccl_comm", {"uid_box": uid_box})]
    ) as collect:
        res = collect()
    assert res[0] == {"sent": 4 << 20} and res[1] == {"equal": True}


@pytest.mark.multi_gpu
def test_nccl_process_group_channel_between_two_processes():
    pages_buf, _ = _packed_pages()
    with _two_processes(
        [("nccl_channel", {"pages_buf": pages_buf}), ("nccl_channel", {"pages_buf": pages_buf})]
    ) as collect:
        res = collect()
    assert res[1]["device"] == "cuda:1" and res[1]["same"] and res[1]["ones"]
    assert res[1]["meta"] == {"request": "r7", "layer": 0}
