"""`zipserve bench transfer`: bandwidth against message size (4 KB .. 256 MB) of every KV
channel this machine can run, one CSV row per (channel, size) and one PNG.

Channels (each moves a device buffer from a sender to a receiver buffer on the receiving device):
  host           the host-bytes path: D2H copy, bytes, CRC32 on both ends, H2D copy (CPU too)
  inproc_device  two engines in one process: InProcessChannel hands the tensor over, receiver
                 copies it device-to-device into its buffer (as into its page pool)
  checksum       device_checksum alone (what the device path adds per message, on each end)
  cuda_ipc       two processes on GPU 0: CudaIpcChannel (gloo control), receiver maps + D2D copy
  nccl_self      ctypes NCCL, one rank sending to itself inside a group (one GPU)
  nccl_pg        two processes on GPUs 0 and 1: NCCL ProcessGroupChannel
  nccl_ctypes    two processes on GPUs 0 and 1: ctypes NcclComm send/recv on our own streams
Times are wall clock around `reps` back-to-back messages after one warm-up message, ending when
the data is in the receiver's buffer (synchronized / acknowledged).
"""

from __future__ import annotations

import csv
import time
import zlib
from pathlib import Path

import torch
import torch.multiprocessing as mp

from zipserve.transfer.nccl_env import apply_nccl_defaults
from zipserve.transfer.ports import free_port

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]


def _reps(nbytes: int, budget: int = 1 << 30) -> int:
    """Enough messages to move ~budget bytes (at least 3, at most 200)."""
    return max(3, min(200, budget // nbytes))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# -- in one process ------------------------------------------------------------------------------
def _time_host(src: torch.Tensor, dst: torch.Tensor, reps: int) -> float:
    from zipserve.transfer.inprocess import InProcessChannel

    a, b = InProcessChannel.pair()

    def one() -> None:
        data = src.cpu().numpy().tobytes()
        crc = zlib.crc32(data)
        a.send(data, 1)
        got = b.recv(1, timeout=60)
        if zlib.crc32(got.numpy()) != crc:
            raise RuntimeError("crc mismatch")
        dst.copy_(got)

    return _timed(one, reps, dst.device)


def _time_inproc_device(src: torch.Tensor, dst: torch.Tensor, reps: int) -> float:
    from zipserve.transfer.inprocess import InProcessChannel

    a, b = InProcessChannel.pair()

    def one() -> None:
        a.send(src, 1)
        dst.copy_(b.recv(1, timeout=60))

    return _timed(one, reps, dst.device)


def _time_checksum(src: torch.Tensor, dst: torch.Tensor, reps: int) -> float:
    from zipserve.compress.wire import device_checksum

    return _timed(lambda: device_checksum(src).item(), reps, src.device)


def _time_nccl_self(src: torch.Tensor, dst: torch.Tensor, reps: int, comm=None) -> float:
    from zipserve.transfer import nccl

    stream = torch.cuda.current_stream(src.device)

    def one() -> None:
        with nccl.group():
            comm.send(src, 0, stream)
            comm.recv(dst, 0, stream)

    return _timed(one, reps, src.device)


def _timed(one, reps: int, dev: torch.device) -> float:
    one()  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        one()
    _sync(dev)
    return time.perf_counter() - t0


# -- two processes ---------------------------------------------------------------------------------
def _pair_role(
    rank: int, kind: str, port: int, devices: tuple[int, int], sizes: list[int], uid_box, results
) -> None:
    """One side of a two-process channel; rank 0 sends and reports seconds per size."""
    try:
        apply_nccl_defaults()
        dev = torch.device("cuda", devices[rank])
        torch.cuda.set_device(dev)
        send, recv, flush, close = _endpoint(kind, rank, port, dev, uid_box)
        out = []
        for size in sizes:
            reps = _reps(size)
            buf = (
                torch.randint(0, 256, (size,), dtype=torch.uint8, device=dev)
                if rank == 0
                else torch.empty(size, dtype=torch.uint8, device=dev)
            )
            for phase in ("warm", "timed"):
                n = 1 if phase == "warm" else reps
                torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                for _ in range(n):
                    send(buf) if rank == 0 else recv(buf)
                flush()  # sender: acks (IPC) / stream done (ctypes)
                torch.cuda.synchronize(dev)  # receiver: the data is in its buffer
                dt = time.perf_counter() - t0
            if rank == 1:
                out.append((size, reps, dt))
        close()
        results.put((rank, "ok", out))
    except BaseException as e:  # reported to the parent
        import traceback

        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _endpoint(kind: str, rank: int, port: int, dev: torch.device, uid_box):
    """(send(buf), recv(buf), flush(), close()) for one channel kind."""
    if kind == "nccl_ctypes":
        from zipserve.transfer import nccl

        uid = nccl.get_unique_id() if rank == 0 else None
        if rank == 0:
            uid_box.put(uid)
        else:
            uid = uid_box.get(timeout=60)
        comm = nccl.NcclComm(uid, 2, rank, dev)
        stream = torch.cuda.Stream(dev)
        return (
            lambda b: comm.send(b, 1, stream),
            lambda b: comm.recv(b, 0, stream),
            lambda: comm.wait(stream, 120),
            comm.destroy,
        )
    from zipserve.transfer.process_group import ProcessGroupChannel

    if kind == "nccl_pg":
        ch = ProcessGroupChannel("127.0.0.1", port, rank, backend="nccl", device=dev, timeout_s=120)
        return (
            lambda b: ch.send(b, 1),
            lambda b: b.copy_(ch.recv(1, timeout=120)),
            lambda: None,
            ch.close,
        )
    if kind == "cuda_ipc":
        from zipserve.transfer.cuda_ipc import CudaIpcChannel

        ch = CudaIpcChannel(
            ProcessGroupChannel("127.0.0.1", port, rank, timeout_s=120), dev, ack_timeout_s=120
        )

        def recv_ipc(b: torch.Tensor) -> None:
            lease = ch.recv_lease(1, timeout=120)
            b.copy_(lease.tensor)  # device-to-device, as into the page pool
            lease.release()

        return (
            lambda b: ch.send(b, 1),
            recv_ipc,
            lambda: ch.wait_acked(120) if rank == 0 else None,
            ch.close,
        )
    raise ValueError(f"unknown channel {kind!r}")


def _two_processes(kind: str, devices: tuple[int, int], sizes: list[int]) -> list[tuple]:
    ctx = mp.get_context("spawn")
    port, uid_box, results = free_port(), ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(
            target=_pair_role, args=(r, kind, port, devices, sizes, uid_box, results), daemon=True
        )
        for r in (0, 1)
    ]
    for p in procs:
        p.start()
    got = {}
    try:
        while len(got) < 2:
            rank, status, value = results.get(timeout=300)
            if status != "ok":
                raise RuntimeError(f"{kind} rank {rank}: {value}")
            got[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return got[1]


# -- driver --------------------------------------------------------------------------------------
def run(
    out_dir: Path,
    channels: list[str] | None = None,
    max_bytes: int = 256 << 20,
    device: str | None = None,
) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    apply_nccl_defaults()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    name = torch.cuda.get_device_name(dev) if gpus else "cpu"
    available = (
        ["host"]
        + (["inproc_device", "checksum", "cuda_ipc", "nccl_self"] if gpus else [])
        + (["nccl_pg", "nccl_ctypes"] if gpus >= 2 else [])
    )
    wanted = channels or available
    skipped = [c for c in wanted if c not in available]
    if skipped:
        print(f"not available here ({gpus} GPUs): {', '.join(skipped)}")
    sizes = [s for s in SIZES if s <= max_bytes]
    rows = []

    def add(channel: str, size: int, reps: int, seconds: float) -> None:
        gbs = size * reps / seconds / 1e9
        rows.append(
            {
                "channel": channel,
                "bytes": size,
                "reps": reps,
                "seconds": seconds,
                "GB_per_s": gbs,
                "device": name,
            }
        )
        print(f"{channel:>13} {size / 1024:>10.0f} KiB x{reps:<4d} {gbs:8.2f} GB/s", flush=True)

    for channel in [c for c in wanted if c in available]:
        if channel in ("cuda_ipc", "nccl_pg", "nccl_ctypes"):
            devices = (0, 0) if channel == "cuda_ipc" else (0, 1)
            try:
                for size, reps, dt in _two_processes(channel, devices, sizes):
                    add(channel, size, reps, dt)
            except Exception as e:  # report and go on with the other channels
                print(f"{channel} FAILED: {e}")
                rows.append(
                    {
                        "channel": channel,
                        "bytes": 0,
                        "reps": 0,
                        "seconds": 0,
                        "GB_per_s": float("nan"),
                        "device": f"FAILED: {e}"[:200],
                    }
                )
            continue
        comm = None
        if channel == "nccl_self":
            from zipserve.transfer import nccl

            comm = nccl.NcclComm(nccl.get_unique_id(), 1, 0, dev)
        fn = {
            "host": _time_host,
            "inproc_device": _time_inproc_device,
            "checksum": _time_checksum,
            "nccl_self": _time_nccl_self,
        }[channel]
        for size in sizes:
            reps = _reps(size) if dev.type == "cuda" else max(3, min(50, (64 << 20) // size))
            src = torch.randint(0, 256, (size,), dtype=torch.uint8, device=dev)
            dst = torch.empty_like(src)
            dt = fn(src, dst, reps, comm) if comm is not None else fn(src, dst, reps)
            add(channel, size, reps, dt)
            del src, dst
        if comm is not None:
            comm.destroy()
    with open(out_dir / "transfer.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, out_dir / "transfer.png", name)
    print(f"wrote {out_dir / 'transfer.csv'}")
    return rows


def _plot(rows: list[dict], path: Path, name: str) -> None:
    from zipserve.bench.plotting import pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for channel in dict.fromkeys(r["channel"] for r in rows):
        pts = [(r["bytes"], r["GB_per_s"]) for r in rows if r["channel"] == channel and r["bytes"]]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=channel)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message bytes")
    ax.set_ylabel("GB/s")
    ax.set_title(f"KV channel bandwidth ({name})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
