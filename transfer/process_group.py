"""`ProcessGroupChannel`: a channel between exactly two processes over a private torch.distributed
process group (gloo on CPU, NCCL on GPU), built without touching the global default group.

Connection: rank 0 hosts a `TCPStore` at (store_addr, port), rank 1 connects to it; everything
this pair writes to the store lives under a `PrefixStore` named after the pair, so several pairs
can share one store server. Before the backend is built both sides exchange a JSON "hello" dict
through the store; each side checks the peer's hello against its `expect` dict and the pair
fails on both sides with a `TransferError` naming the first mismatching key.

Framing: each message is a 4 x int64 `Header` (magic, length, tag, crc32) on one backend tag and
the payload (uint8, skipped when empty) on another.

Receiving: a background thread keeps a receive posted, reads whole messages and files them by
tag in a `Mailbox`; `recv(tag, timeout)` takes from there. So a timed-out recv changes nothing
and the channel stays usable (the message, when it arrives, waits for the next recv); messages
are buffered without bound until received. A timed-out or failed *send* closes the channel (gloo
closes the connection when an operation times out), and then every call raises TransferError.
- gloo: the thread starts at connect on both sides, so the channel is bidirectional and a send
  never waits for the application on the other side to call recv.
- nccl: an endpoint is one-directional, fixed by its first send or recv (a posted NCCL receive
  and a send to the same peer share one stream, so both directions on one endpoint could
  deadlock); open a second pair for the other direction. Payloads live on `device`, the CRC is
  off by default (it would copy to the host), and `recv` returns device tensors.

Closing: close() sends a CLOSE control message (the peer's pending recvs then raise
TransferClosed once drained) and stops the receive thread; for gloo it does so by letting a
dummy receive time out, which makes gloo drop the connection; for nccl it aborts the
communicator (sends are synchronous, so none of ours is in flight). That is also what happens on a
crash: the peer sees TransferError, never a hang.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from zipserve.transfer.channel import (
    CLOSE_TAG,
    NO_CRC,
    Buffer,
    Channel,
    Header,
    TransferChecksumError,
    TransferClosed,
    TransferError,
    TransferTimeout,
    as_byte_tensor,
    check_tag,
    crc32_of,
)
from zipserve.transfer.group_builder import (
    BackendUnavailable,
    GroupSpec,
    build_group,
    loopback_gloo_hostname,
    rendezvous,
)
from zipserve.transfer.mailbox import Mailbox

_PG_TAG_HEADER, _PG_TAG_PAYLOAD, _PG_TAG_ABORT = 17, 18, 19
_FOREVER = timedelta(days=3650)


class ProcessGroupChannel(Channel):
    def __init__(
        self,
        store_addr: str,
        port: int,
        rank: int,
        backend: str = "gloo",
        timeout_s: float = 60.0,
        *,
        hello: dict[str, Any] | None = None,
        expect: dict[str, Any] | None = None,
        pair_name: str = "kv",
        device: torch.device | str | None = None,
        gloo_hostname: str | None = None,
        checksum: bool | None = None,
        store: Any = None,
    ) -> None:
        """Connect to the other rank (blocks until it connects or timeout_s passes).

        store_addr, port: the TCPStore that rank 0 serves and rank 1 dials. rank: 0 or 1.
        backend: "gloo" (CPU tensors) or "nccl" (CUDA tensors on `device`).
        timeout_s: connect, handshake and per-send timeout. hello: this side's JSON-able
        compatibility dict. expect: key -> value the peer's hello must have.
        pair_name: store namespace of this pair. gloo_hostname: the address gloo listens on
        (default: 127.0.0.1 when store_addr is loopback, else the host's resolved name).
        checksum: CRC32 per message (default: on for gloo, off for nccl).
        store: an existing torch.distributed Store to use instead of creating a TCPStore at
        (store_addr, port) (several pairs can share one; pair_name must then be unique per
        connection, since the handshake keys are not cleared).
        """
        super().__init__()
        if rank not in (0, 1):
            raise ValueError(f"rank must be 0 or 1, got {rank}")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        self.rank, self.peer, self.backend = rank, 1 - rank, backend
        self.timeout_s = timeout_s
        self.device = (
            torch.device("cpu")
            if backend == "gloo"
            else torch.device(
                device if device is not None else f"cuda:{torch.cuda.current_device()}"
            )
        )
        self.checksum = (backend == "gloo") if checksum is None else checksum
        self.peer_hello: dict[str, Any] = {}
        self._send_lock, self._state_lock = threading.Lock(), threading.Lock()
        self._mailbox = Mailbox()
        self._closed = False
        self._broken = False  # a send failed: gloo dropped the connection / nccl op stuck
        self._peer_closed = False  # the peer's CLOSE message arrived
        self._direction: str | None = None  # nccl: "send" or "recv" once fixed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

        timeout = timedelta(seconds=timeout_s)
        try:
            if store is None:
                store = rendezvous(store_addr, port, rank, 2, timeout)
        except Exception as e:  # torch raises several types here
            raise TransferError(
                f"cannot reach the store at {store_addr}:{port} as rank {rank}: {e}"
            ) from e
        self.rendezvous_store = store
        """The pair's store (rank 0 serves it); another group of this pair may form on it."""
        self.pair_store = dist.PrefixStore(f"zipserve/transfer/{pair_name}/", store)
        """This connection's namespace in it (the handshake; transports may add keys)."""
        self._handshake(hello or {}, expect or {})
        self._pg = _build(self.pair_store, rank, backend, timeout, store_addr, gloo_hostname)
        if backend == "gloo":
            self._start_receiver()

    @property
    def path(self) -> str:  # type: ignore[override]
        """ "host" over gloo, "nccl" over NCCL."""
        return "host" if self.backend == "gloo" else "nccl"

    @property
    def carries_device_tensors(self) -> bool:  # type: ignore[override]
        return self.backend == "nccl"

    @classmethod
    def connect(
        cls,
        store_addr: str,
        port: int,
        rank: int,
        hello: dict[str, Any],
        expect: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> ProcessGroupChannel:
        """Connect and check compatibility: raises TransferError naming the first key of
        `expect` whose value the peer's hello does not have (on both sides)."""
        return cls(store_addr, port, rank, hello=hello, expect=expect, **kwargs)

    # -- handshake --------------------------------------------------------------------------
    def _handshake(self, hello: dict[str, Any], expect: dict[str, Any]) -> None:
        s, me, peer = self.pair_store, self.rank, self.peer
        try:
            s.set(f"hello/{me}", json.dumps(hello))
            self.peer_hello = json.loads(s.get(f"hello/{peer}"))
            problem = _mismatch(self.peer_hello, expect, peer)
            s.set(f"verdict/{me}", problem)
            peer_problem = s.get(f"verdict/{peer}").decode()
            # rank 0 serves the store: it waits until rank 1 has read everything it needs
            if me == 1:
                s.set("handshake_done", "1")
            else:
                s.get("handshake_done")
        except Exception as e:
            raise TransferError(f"handshake with rank {peer} failed: {e}") from e
        if problem:
            raise TransferError(problem)
        if peer_problem:
            raise TransferError(f"rank {peer} refused the connection: {peer_problem}")

    # -- sending ----------------------------------------------------------------------------
    def send(self, buf: Buffer, tag: int) -> None:
        check_tag(tag)
        self._claim("send")
        payload = as_byte_tensor(buf).to(self.device)
        crc = crc32_of(payload) if self.checksum else NO_CRC
        with self._send_lock:
            self._check_open()
            self._send_frame(Header(payload.numel(), tag, crc), payload)
        self._count_sent(payload.numel())

    def _send_frame(
        self, h: Header, payload: torch.Tensor | None, timeout_s: float | None = None
    ) -> None:
        try:
            self._finish(
                self._pg.send([h.to_tensor().to(self.device)], self.peer, _PG_TAG_HEADER), timeout_s
            )
            if h.length:
                self._finish(self._pg.send([payload], self.peer, _PG_TAG_PAYLOAD), timeout_s)
        except TransferError:
            self._mark_broken()
            raise
        except Exception as e:  # backend errors are RuntimeErrors
            self._mark_broken()
            if "timed out" in str(e).lower() or "timeout" in str(e).lower():
                raise TransferTimeout(f"send to rank {self.peer} timed out: {e}") from e
            raise TransferError(f"send to rank {self.peer} failed: {e}") from e

    def _finish(self, work: Any, timeout_s: float | None = None) -> None:
        """Block until a send completes (gloo: its op timeout; nccl: poll until the deadline)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if self.backend == "gloo":
            work.wait(timedelta(seconds=timeout_s))
        elif not _poll(work, time.monotonic() + timeout_s, None):
            raise TransferTimeout(f"send to rank {self.peer} did not finish in {timeout_s} s")

    # -- receiving --------------------------------------------------------------------------
    def recv(self, tag: int, timeout: float | None = None) -> torch.Tensor:
        check_tag(tag)
        self._claim("recv")
        if self._closed:
            raise TransferClosed("recv on a closed channel")
        msg = self._mailbox.get(tag, timeout)
        self._count_received(msg.numel())
        return msg

    def _start_receiver(self) -> None:
        self._thread = threading.Thread(
            target=self._receive_loop, daemon=True, name=f"zipserve-recv-rank{self.rank}"
        )
        self._thread.start()

    def _receive_loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            while not self._stop.is_set():
                hdr = torch.empty(Header.NUM_WORDS, dtype=torch.int64, device=self.device)
                if not self._wait_recv(self._pg.recv([hdr], self.peer, _PG_TAG_HEADER), None):
                    return
                h = Header.from_tensor(hdr)
                if h.tag == CLOSE_TAG:
                    self._peer_closed = True
                    self._mailbox.close(f"rank {self.peer} closed the channel")
                    return
                payload = torch.empty(h.length, dtype=torch.uint8, device=self.device)
                if h.length and not self._wait_recv(
                    self._pg.recv([payload], self.peer, _PG_TAG_PAYLOAD), self.timeout_s
                ):
                    return
                if h.crc32 != NO_CRC and crc32_of(payload) != h.crc32:
                    raise TransferChecksumError(
                        f"checksum mismatch on a {h.length}-byte message with "
                        f"tag {h.tag}: corrupted in transit"
                    )
                self._mailbox.put(h.tag, payload)
        except Exception as e:
            if self._stop.is_set():
                self._mailbox.close("the channel was closed")
            else:
                self._mailbox.fail(e)

    def _wait_recv(self, work: Any, timeout_s: float | None) -> bool:
        """True once the receive completed; False if close() stopped the wait (nccl)."""
        if self.backend == "gloo":
            # A gloo wait that times out drops the connection, so wait "forever" here; close()
            # and a dead peer end the wait with an exception.
            work.wait(_FOREVER if timeout_s is None else timedelta(seconds=timeout_s))
            return True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if _poll(work, deadline, self._stop):
            return True
        if not self._stop.is_set():
            raise TransferTimeout(f"payload from rank {self.peer} stalled for {timeout_s} s")
        return False

    # -- state ------------------------------------------------------------------------------
    def _claim(self, direction: str) -> None:
        """nccl endpoints are one-directional: the first send or recv fixes the direction."""
        if self.backend != "nccl":
            return
        with self._state_lock:
            if self._direction is None:
                self._direction = direction
                if direction == "recv" and not self._closed:
                    self._start_receiver()
            elif self._direction != direction:
                raise TransferError(
                    f"this nccl endpoint only {self._direction}s; open a second "
                    f"pair for the other direction"
                )

    def _check_open(self) -> None:
        if self._closed:
            raise TransferClosed("send on a closed channel")
        if self._peer_closed:
            raise TransferClosed(f"rank {self.peer} closed the channel")
        if self._broken:
            raise TransferClosed("the channel is broken by an earlier failed send")

    def _mark_broken(self) -> None:
        self._broken = True

    def close(self) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        receiving = self._thread is not None and self._thread.is_alive()
        sending = self.backend == "gloo" or self._direction == "send"
        if sending and not self._broken and not self._peer_closed:
            with self._send_lock:
                try:  # best effort: the peer may be gone already
                    self._send_frame(Header(0, CLOSE_TAG), None, min(self.timeout_s, 5.0))
                except TransferError:
                    pass
        self._stop.set()
        if receiving and self.backend == "gloo":
            _drop_gloo_connection(self._pg, self.peer)
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        self._mailbox.close("the channel was closed")
        try:
            # nccl: abort, never shutdown. Our sends are synchronous (done before send()
            # returned), so nothing of ours is in flight; a shutdown would wait on a posted
            # receive, or on NCCL's teardown with a peer that already aborted its side.
            if self.backend == "nccl":
                self._pg.abort()
            elif self._thread is None or not self._thread.is_alive():
                self._pg.shutdown()
        except Exception:  # teardown is best effort
            pass
        self._pg = None
        self.pair_store = self.rendezvous_store = None


def _mismatch(peer_hello: dict[str, Any], expect: dict[str, Any], peer: int) -> str:
    for key, want in expect.items():
        have = peer_hello.get(key, "<missing>")
        if have != want:
            return (
                f"handshake mismatch on {key!r}: rank {peer} has {have!r}, this side "
                f"expects {want!r}"
            )
    return ""


def _poll(work: Any, deadline: float | None, stop: threading.Event | None) -> bool:
    """Poll work.is_completed() (nccl) until done (True) or deadline/stop (False)."""
    pause = 0.0
    while not work.is_completed():
        if (deadline is not None and time.monotonic() > deadline) or (stop and stop.is_set()):
            return False
        time.sleep(pause)
        pause = min(1e-3, pause * 2 + 2e-5)
    work.wait()  # surfaces an error, if any, and orders the current stream after the op
    return True


def _drop_gloo_connection(pg: Any, peer: int) -> None:
    """Make gloo close the connection to peer (its only way to end a blocked receive): a
    receive that times out closes the pair, and every pending operation on it fails."""
    try:
        pg.recv([torch.empty(1, dtype=torch.uint8)], peer, _PG_TAG_ABORT).wait(
            timedelta(milliseconds=1)
        )
    except Exception:  # the expected timeout
        pass


def _build(
    store: Any,
    rank: int,
    backend: str,
    timeout: timedelta,
    store_addr: str,
    gloo_hostname: str | None,
) -> Any:
    """The pair's backend group (transfer/group_builder.py). nccl: an idle receiver keeps a
    receive posted and our own deadlines detect hangs, so NCCL's watchdog gets at least a day
    instead of tearing the process down while a channel is merely idle."""
    if backend == "gloo":
        spec = GroupSpec(
            "gloo",
            rank,
            2,
            timeout,
            gloo_hostname=gloo_hostname or loopback_gloo_hostname(store_addr),
        )
    else:
        spec = GroupSpec("nccl", rank, 2, max(timeout, timedelta(days=1)))
    try:
        return build_group(store, spec)
    except BackendUnavailable as e:
        raise TransferError(str(e)) from None
    except Exception as e:
        if backend == "nccl":
            raise
        raise TransferError(f"gloo connection between the two ranks failed: {e}") from e
