"""A small ctypes binding to the libnccl that torch already loads: point-to-point send/recv of
CUDA tensors on streams the caller chooses (the process-group API hides its streams).

The library is found, in order: $ZIPSERVE_LIBNCCL, a libnccl already mapped into this process
(torch's CUDA build loads the one of its nvidia-nccl-cu* wheel at import; using the same copy
avoids two NCCL instances), the dynamic loader's search for "libnccl.so.2", then torch/lib and
the nvidia/*/lib directories of the nvidia-nccl-cu* wheels. Importing this module never fails;
`nccl_available()` says whether a library was found, and every call raises NcclError naming the
places searched when none was.

Semantics follow nccl.h: ncclUniqueId is a struct of 128 bytes passed by value to
ncclCommInitRank (blocking until all ranks joined, on the current CUDA device); ncclSend/ncclRecv
take a count of ncclUint8 elements (so any dtype travels as bytes) and are asynchronous on the
given stream; a rank may send to and receive from itself, but only inside one
ncclGroupStart/End; ncclCommDestroy needs the communicator's work finished, ncclCommAbort does
not; ncclGetErrorString / ncclGetLastError give the messages of NcclError.

Usage: rank 0 calls `get_unique_id()` and passes the 128 bytes to the other ranks (store, Ray,
a file); every rank then builds `NcclComm(uid, nranks, rank, device)` concurrently (the call
blocks until all ranks have joined). Tensors are sent as raw bytes, so any dtype works as long
as both sides agree on the byte count. Sends and recvs are asynchronous on `stream`; on a
stream other than the current one, the op first waits for the work already queued on the
current stream (which produced the data) and the tensor is protected with record_stream.
The NCCL environment (transfer/nccl_env.py) is applied before the library is first used.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from zipserve.transfer.nccl_env import apply_nccl_defaults

UNIQUE_ID_BYTES = 128
_NCCL_UINT8 = 1  # ncclUint8 in ncclDataType_t
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_error: str | None = None


class NcclError(RuntimeError):
    """An NCCL call returned an error (the message carries NCCL's error string)."""


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_ubyte * UNIQUE_ID_BYTES)]


def _candidates() -> list[str]:
    found: list[str] = (
        [os.environ["ZIPSERVE_LIBNCCL"]] if os.environ.get("ZIPSERVE_LIBNCCL") else []
    )
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if line.strip() else ""
                if "libnccl" in os.path.basename(path) and path not in found:
                    found.append(path)
    except OSError:
        pass
    found.append("libnccl.so.2")
    patterns = [os.path.join(os.path.dirname(torch.__file__), "lib", "libnccl.so*")]
    patterns += [os.path.join(p, "nvidia", "*", "lib", "libnccl.so*") for p in sys.path if p]
    for pattern in patterns:  # nvidia/nccl/lib (cu12 wheels) or nvidia/cu13/lib (cu13)
        found += [f for f in sorted(glob.glob(pattern)) if f not in found]
    return found


def _load() -> ctypes.CDLL:
    global _lib, _lib_error
    with _lock:
        if _lib is not None:
            return _lib
        if _lib_error is not None:
            raise NcclError(_lib_error)
        apply_nccl_defaults()
        errors = []
        for path in _candidates():
            try:
                lib = ctypes.CDLL(path)
                getattr(lib, "ncclGetVersion")  # noqa: B009 - raises AttributeError unless NCCL
                break
            except (OSError, AttributeError) as e:
                errors.append(f"{path}: {e}")
        else:
            _lib_error = (
                "libnccl not found: torch's CUDA build ships it in the nvidia-nccl-cu12"
                " / -cu13 wheel (pip install nvidia-nccl-cu12), or point "
                "ZIPSERVE_LIBNCCL at a libnccl.so.2 (tried: " + "; ".join(errors[-3:]) + ")"
            )
            raise NcclError(_lib_error)
        _declare(lib)
        _lib = lib
        return lib


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_void_p, c_size_t = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
    lib.ncclGetVersion.argtypes = [ctypes.POINTER(c_int)]
    lib.ncclGetErrorString.argtypes = [c_int]
    lib.ncclGetErrorString.restype = ctypes.c_char_p
    lib.ncclGetUniqueId.argtypes = [ctypes.POINTER(_UniqueId)]
    lib.ncclCommInitRank.argtypes = [ctypes.POINTER(c_void_p), c_int, _UniqueId, c_int]
    for name in ("ncclSend", "ncclRecv"):
        getattr(lib, name).argtypes = [c_void_p, c_size_t, c_int, c_int, c_void_p, c_void_p]
    for name in ("ncclCommDestroy", "ncclCommAbort"):
        getattr(lib, name).argtypes = [c_void_p]
    lib.ncclGroupStart.argtypes = lib.ncclGroupEnd.argtypes = []
    lib.ncclCommGetAsyncError.argtypes = [c_void_p, ctypes.POINTER(c_int)]
    if hasattr(lib, "ncclGetLastError"):
        lib.ncclGetLastError.argtypes = [c_void_p]
        lib.ncclGetLastError.restype = ctypes.c_char_p
    for name in (
        "ncclCommInitRank",
        "ncclSend",
        "ncclRecv",
        "ncclCommDestroy",
        "ncclCommAbort",
        "ncclGetVersion",
        "ncclGetUniqueId",
        "ncclGroupStart",
        "ncclGroupEnd",
        "ncclCommGetAsyncError",
    ):
        getattr(lib, name).restype = c_int


def _check(lib: ctypes.CDLL, result: int, what: str, comm: int | None = None) -> None:
    if result == 0:
        return
    msg = lib.ncclGetErrorString(result).decode(errors="replace")
    if comm is not None and hasattr(lib, "ncclGetLastError"):
        last = lib.ncclGetLastError(comm)
        if last:
            msg += f" ({last.decode(errors='replace')})"
    raise NcclError(f"{what} failed: NCCL error {result}: {msg}")


def nccl_available() -> bool:
    """Whether a libnccl could be loaded in this process."""
    try:
        _load()
        return True
    except NcclError:
        return False


def nccl_version() -> tuple[int, int, int]:
    """(major, minor, patch) of the loaded libnccl."""
    lib = _load()
    v = ctypes.c_int()
    _check(lib, lib.ncclGetVersion(ctypes.byref(v)), "ncclGetVersion")
    code = v.value
    if code >= 10000:  # 2.9 and later: major * 10000 + minor * 100 + patch
        return code // 10000, code // 100 % 100, code % 100
    return code // 1000, code // 100 % 10, code % 100


def get_unique_id() -> bytes:
    """A fresh 128-byte NCCL unique id (rank 0 makes it and shares it)."""
    lib = _load()
    uid = _UniqueId()
    _check(lib, lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
    return bytes(uid.internal)


@contextmanager
def group() -> Iterator[None]:
    """ncclGroupStart/End: sends and recvs issued inside run as one fused operation (needed
    when a rank both sends to and receives from a peer at the same time)."""
    lib = _load()
    _check(lib, lib.ncclGroupStart(), "ncclGroupStart")
    try:
        yield
    finally:
        _check(lib, lib.ncclGroupEnd(), "ncclGroupEnd")


class NcclComm:
    """One rank's NCCL communicator on one CUDA device."""

    def __init__(
        self, unique_id: bytes, nranks: int, rank: int, device: torch.device | str | int
    ) -> None:
        if len(unique_id) != UNIQUE_ID_BYTES:
            raise ValueError(f"unique_id must be {UNIQUE_ID_BYTES} bytes, got {len(unique_id)}")
        if not 0 <= rank < nranks:
            raise ValueError(f"rank {rank} is not in [0, {nranks})")
        self._lib = _load()
        self.nranks, self.rank = nranks, rank
        self.device = (
            torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        )
        if self.device.type != "cuda":
            raise ValueError(f"NcclComm needs a CUDA device, got {self.device}")
        uid = _UniqueId()
        ctypes.memmove(uid.internal, unique_id, UNIQUE_ID_BYTES)
        comm = ctypes.c_void_p()
        torch.cuda.init()  # NCCL needs the device's primary context current
        with torch.cuda.device(self.device):
            _check(
                self._lib,
                self._lib.ncclCommInitRank(ctypes.byref(comm), nranks, uid, rank),
                "ncclCommInitRank",
            )
        self._comm: int | None = comm.value

    def _args(
        self, tensor: torch.Tensor, peer: int, stream: torch.cuda.Stream | None
    ) -> tuple[int, int, int]:
        if self._comm is None:
            raise NcclError("the communicator was destroyed")
        if tensor.device != self.device:
            raise ValueError(f"tensor is on {tensor.device}, the communicator on {self.device}")
        if not tensor.is_contiguous():
            raise ValueError("NCCL send/recv needs a contiguous tensor")
        if not 0 <= peer < self.nranks:  # peer == rank is allowed inside group()
            raise ValueError(f"bad peer {peer} for rank {self.rank} of {self.nranks}")
        current = torch.cuda.current_stream(self.device)
        stream = current if stream is None else stream
        if stream.cuda_stream != current.cuda_stream:
            stream.wait_stream(current)  # the data (send) / the free buffer (recv) is ready
            tensor.record_stream(stream)
        return tensor.data_ptr(), tensor.numel() * tensor.element_size(), stream.cuda_stream

    def send(
        self, tensor: torch.Tensor, peer: int, stream: torch.cuda.Stream | None = None
    ) -> None:
        """Enqueue sending tensor's bytes to peer on stream (default: the current stream)."""
        ptr, nbytes, s = self._args(tensor, peer, stream)
        _check(
            self._lib,
            self._lib.ncclSend(ptr, nbytes, _NCCL_UINT8, peer, self._comm, s),
            "ncclSend",
            self._comm,
        )

    def recv(
        self, tensor: torch.Tensor, peer: int, stream: torch.cuda.Stream | None = None
    ) -> None:
        """Enqueue receiving tensor.nbytes bytes from peer into tensor on stream."""
        ptr, nbytes, s = self._args(tensor, peer, stream)
        _check(
            self._lib,
            self._lib.ncclRecv(ptr, nbytes, _NCCL_UINT8, peer, self._comm, s),
            "ncclRecv",
            self._comm,
        )

    def async_error(self) -> str | None:
        """NCCL's asynchronous error of this communicator (peer died, network), or None."""
        if self._comm is None:
            return None
        err = ctypes.c_int()
        _check(
            self._lib,
            self._lib.ncclCommGetAsyncError(self._comm, ctypes.byref(err)),
            "ncclCommGetAsyncError",
        )
        if err.value in (0, 7):  # ncclSuccess, ncclInProgress
            return None
        return self._lib.ncclGetErrorString(err.value).decode(errors="replace")

    def wait(self, stream: torch.cuda.Stream | None = None, timeout_s: float = 60.0) -> None:
        """Block until the work queued on stream (default: current) is done. A peer that never
        matches a send/recv would hang the stream forever: after timeout_s, or on an async
        NCCL error, the communicator is aborted (its pending ops end) and NcclError raised."""
        import time

        stream = torch.cuda.current_stream(self.device) if stream is None else stream
        done = torch.cuda.Event()
        done.record(stream)
        deadline, pause = time.monotonic() + timeout_s, 0.0
        while not done.query():
            err = self.async_error()
            if err is not None or time.monotonic() > deadline:
                self.abort()
                raise NcclError(
                    f"NCCL operation failed: {err}"
                    if err
                    else f"NCCL operation did not finish within {timeout_s} s "
                    f"(peer gone?); communicator aborted"
                )
            time.sleep(pause)
            pause = min(1e-3, pause * 2 + 1e-5)

    def destroy(self) -> None:
        """Free the communicator once its queued work has finished; idempotent."""
        if self._comm is not None:
            torch.cuda.synchronize(self.device)
            comm, self._comm = self._comm, None
            _check(self._lib, self._lib.ncclCommDestroy(comm), "ncclCommDestroy")

    def abort(self) -> None:
        """Tear the communicator down without waiting for pending operations."""
        if self._comm is not None:
            comm, self._comm = self._comm, None
            _check(self._lib, self._lib.ncclCommAbort(comm), "ncclCommAbort")
