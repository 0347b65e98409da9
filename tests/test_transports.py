"""transfer/: channels declare what they carry on their class, one table chooses and opens a
pair's KV path, one builder makes process groups, one function sets the NCCL environment."""

from __future__ import annotations

import os
import re
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from zipserve.transfer import transports
from zipserve.transfer.channel import Channel, TransferError
from zipserve.transfer.cuda_ipc import CudaIpcChannel
from zipserve.transfer.group_builder import GroupSpec, build_group, rendezvous
from zipserve.transfer.inprocess import InProcessChannel, InProcessHostChannel
from zipserve.transfer.kv_messages import use_device_form
from zipserve.transfer.link import LinkEmulator
from zipserve.transfer.nccl_channel import NcclChannel
from zipserve.transfer.nccl_env import NCCL_DEFAULTS, apply_nccl_defaults, nccl_env
from zipserve.transfer.ports import free_port
from zipserve.transfer.process_group import ProcessGroupChannel
from zipserve.transfer.select import Endpoint
from zipserve.transfer.transports import (
    PATHS,
    TRANSPORTS,
    PairSetup,
    Transport,
    choose_path,
    open_transport,
)

REPO = Path(__file__).resolve().parent.parent


# -- declarations ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, path, device, leases, acks",
    [
        (InProcessChannel, "in_process", True, False, False),
        (InProcessHostChannel, "in_process", False, False, False),
        (CudaIpcChannel, "cuda_ipc", True, True, True),
        (NcclChannel, "nccl_ctypes", True, False, False),
    ],
)
def test_channel_classes_declare_what_they_carry(cls, path, device, leases, acks):
    assert (cls.path, cls.carries_device_tensors, cls.leases, cls.acknowledges) == (
        path,
        device,
        leases,
        acks,
    )


def test_table_rows_open_channels_that_declare_their_path():
    assert PATHS == ("auto", "host", "cuda_ipc", "nccl", "nccl_ctypes")
    for path, row in TRANSPORTS.items():
        assert row.path == path
    # the classes the device rows open declare the same path
    assert CudaIpcChannel.path in TRANSPORTS and NcclChannel.path in TRANSPORTS


def test_base_defaults_need_no_probing():
    a, b = InProcessChannel.pair()
    a.send(b"abc", 1)
    lease = b.recv_lease(1, timeout=1)  # a non-leasing channel hands out an owned message
    assert bytes(lease.tensor.numpy()) == b"abc"
    lease.release()
    a.limit_inflight(1)  # no-op: nothing is held for the peer
    assert a.wait_acked(0.0)
    a.close()
    b.close()


def test_link_emulator_passes_the_declarations_through():
    a, _ = InProcessChannel.pair()
    h, _ = InProcessHostChannel.pair()
    assert LinkEmulator(a).carries_device_tensors and LinkEmulator(a).path == "in_process"
    assert not LinkEmulator(h).carries_device_tensors
    assert use_device_form(LinkEmulator(a), "cuda") and not use_device_form(LinkEmulator(h), "cuda")

    class Acking(InProcessChannel):
        acknowledges = True
        limit = None

        def limit_inflight(self, nbytes: int) -> None:
            self.limit = nbytes

    inner, _ = Acking.pair()
    link = LinkEmulator(inner)
    link.limit_inflight(123)
    assert link.acknowledges and inner.limit == 123 and link.wait_acked(0.0)


def test_gloo_pair_declares_the_host_path():
    port, out = free_port(), {}

    def side(rank: int) -> None:
        out[rank] = ProcessGroupChannel("127.0.0.1", port, rank, timeout_s=30)

    threads = [threading.Thread(target=side, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert out[0].path == out[1].path == "host"
        assert not out[0].carries_device_tensors and not out[0].leases
    finally:
        for ch in out.values():
            ch.close()


# -- the table chooses -------------------------------------------------------------------------
def _ep(device="cuda", uuid="GPU-a", host="h1", pid=1, nccl=True, request="auto"):
    return Endpoint(device, uuid if device == "cuda" else "", host, pid, nccl, request)


def test_a_new_transport_is_one_row(monkeypatch):
    """A transport defined here, added as one row, is chosen where possible and opened."""

    class Loopback(InProcessChannel):
        path = "loopback_test"

    opened = []

    def open_loopback(setup: PairSetup) -> Channel:
        opened.append(setup.pair_name)
        return Loopback.pair()[0]

    row = Transport(
        "loopback_test",
        "two processes on one host",
        lambda a, b: a.host == b.host and a.pid != b.pid,
        open_loopback,
        priority=9,
    )
    monkeypatch.setitem(TRANSPORTS, row.path, row)
    assert choose_path(_ep("cpu"), _ep("cpu", pid=2)) == "loopback_test"
    assert choose_path(_ep("cpu"), _ep("cpu", host="h2")) == "host"  # not possible there
    ch = open_transport("loopback_test", PairSetup(None, "cpu", "127.0.0.1", 1, 0, "p", 1.0))
    assert ch.path == "loopback_test" and opened == ["p"]
    with pytest.raises(TransferError, match="unknown transfer path"):
        open_transport("pigeon", PairSetup(None, "cpu", "127.0.0.1", 1, 0, "p", 1.0))


def test_an_unknown_request_is_refused():
    with pytest.raises(ValueError, match="transfer path must be one of"):
        transports.endpoint_for("cpu", "pigeon")


# -- one process-group builder -----------------------------------------------------------------
def test_group_spec_is_checked_where_it_is_built():
    with pytest.raises(ValueError, match="backend"):
        GroupSpec("mpi", 0, 2, timedelta(seconds=1))
    with pytest.raises(ValueError, match="rank 2"):
        GroupSpec("gloo", 2, 2, timedelta(seconds=1))


def test_builder_makes_a_one_rank_gloo_group():
    timeout = timedelta(seconds=30)
    store = rendezvous("127.0.0.1", free_port(), 0, 1, timeout)
    pg = build_group(
        dist.PrefixStore("zipserve/test/", store),
        GroupSpec("gloo", 0, 1, timeout, gloo_hostname="127.0.0.1"),
    )
    t = torch.ones(3)
    pg.allreduce([t]).wait()
    assert t.tolist() == [1.0, 1.0, 1.0]


# -- one place sets the NCCL environment ---------------------------------------------------------
def test_nccl_defaults_fill_in_and_never_override(monkeypatch):
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    apply_nccl_defaults()
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    apply_nccl_defaults()
    assert os.environ["NCCL_NVLS_ENABLE"] == "1"
    assert nccl_env() == NCCL_DEFAULTS and nccl_env() is not NCCL_DEFAULTS


PENDING: set[str] = set()
"""Files that still set it themselves; their owner drops those lines (issue 17), then this
set empties."""


def test_only_nccl_env_sets_nccl_variables():
    setters = sorted(
        str(p.relative_to(REPO))
        for p in REPO.rglob("*.py")
        if "tests" not in p.relative_to(REPO).parts
        and p.name != "nccl_env.py"
        and re.search(r"NCCL_NVLS_ENABLE", p.read_text(errors="replace"))
    )
    assert set(setters) <= PENDING, setters
