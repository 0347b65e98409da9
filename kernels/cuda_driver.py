"""Load prebuilt cubins and launch their kernels through the CUDA driver API (ctypes, no build step).

The CUDA kernels of kernels/cuda/ are compiled offline for sm_90 by kernels/cuda/build.sh and
shipped as cubins beside their sources: the GPU machines need no compiler.  ``CubinModule`` loads
one into the current device's primary context (the one torch uses) and launches its functions on
torch's current stream, so launches are captured by CUDA graphs like any other kernel.

Errors are raised, never swallowed: ``CudaDriverError`` names the driver call and its error string.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch

__all__ = ["CudaDriverError", "CubinModule", "cubin_path"]

CUDA_DIR = Path(__file__).resolve().parent / "cuda"

_lock = threading.Lock()
_thread = threading.local()  # the device whose primary context this thread made current
_lib: ctypes.CDLL | None = None


class CudaDriverError(RuntimeError):
    pass


def cubin_path(name: str) -> Path:
    return CUDA_DIR / name


def _driver() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise CudaDriverError(f"cannot load the CUDA driver (libcuda.so.1): {exc}") from exc
        lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuModuleLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
        lib.cuModuleGetFunction.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_void_p,
            ctypes.c_char_p,
        ]
        lib.cuLaunchKernel.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_void_p),
        ]
        lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
        lib.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        lib.cuFuncGetAttribute.argtypes = [
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        lib.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        _lib = lib
    return _lib


def _check(result: int, what: str) -> None:
    if result != 0:
        msg = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(msg))
        text = msg.value.decode() if msg.value else "unknown error"
        raise CudaDriverError(f"{what} failed: CUDA error {result} ({text})")


def _indexed(device: torch.device) -> torch.device:
    """cuda -> cuda:<current device>."""
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _make_current(device: torch.device) -> None:
    """Make the device's primary context (torch's) current on this thread."""
    torch.cuda.init()
    lib = _driver()
    ctx = ctypes.c_void_p()
    _check(
        lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device.index), "cuDevicePrimaryCtxRetain"
    )
    cur = ctypes.c_void_p()
    _check(lib.cuCtxGetCurrent(ctypes.byref(cur)), "cuCtxGetCurrent")
    if cur.value != ctx.value:
        _check(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


# argument kinds for launch(): "p" pointer (tensor or int), "i" int32, "q" int64, "f" float32
_ARG_TYPES = {"p": ctypes.c_uint64, "i": ctypes.c_int32, "q": ctypes.c_int64, "f": ctypes.c_float}
_NUM_REGS = 4  # CU_FUNC_ATTRIBUTE_NUM_REGS
_LOCAL_BYTES = 3  # CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES
_MAX_DYNAMIC_SHARED = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_SHARED_CARVEOUT = 9  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT (percent of L1)
_DEFAULT_SHARED_LIMIT = 48 * 1024  # dynamic shared memory a launch gets without opting in


class CubinModule:
    """One cubin, loaded lazily once per device; ``launch`` runs a function on torch's stream."""

    def __init__(self, filename: str):
        self.path = cubin_path(filename)
        self._funcs: dict[tuple[int, str], ctypes.c_void_p] = {}
        self._modules: dict[int, ctypes.c_void_p] = {}
        self._shared_limit: dict[tuple[int, str], int] = {}  # opted-in dynamic shared bytes

    def available(self) -> bool:
        return self.path.is_file()

    def function(self, name: str, device: torch.device) -> ctypes.c_void_p:
        device = _indexed(device)
        key = (device.index, name)
        fn = self._funcs.get(key)
        if fn is not None:
            return fn
        with _lock:
            _make_current(device)
            module = self._modules.get(device.index)
            if module is None:
                if not self.available():
                    raise CudaDriverError(f"missing cubin {self.path} (run kernels/cuda/build.sh)")
                module = ctypes.c_void_p()
                _check(
                    _driver().cuModuleLoadData(ctypes.byref(module), self.path.read_bytes()),
                    f"cuModuleLoadData({self.path.name})",
                )
                self._modules[device.index] = module
            fn = ctypes.c_void_p()
            _check(
                _driver().cuModuleGetFunction(ctypes.byref(fn), module, name.encode()),
                f"cuModuleGetFunction({name})",
            )
            self._funcs[key] = fn
        return fn

    def attributes(self, name: str, device: torch.device) -> dict[str, int]:
        """Registers per thread and local (spill) bytes of a function, as loaded."""
        fn = self.function(name, device)
        out = {}
        for key, attr in (("registers", _NUM_REGS), ("local_bytes", _LOCAL_BYTES)):
            v = ctypes.c_int()
            _check(_driver().cuFuncGetAttribute(ctypes.byref(v), attr, fn), "cuFuncGetAttribute")
            out[key] = v.value
        return out

    def _allow_shared(self, name: str, device: torch.device, fn, nbytes: int) -> None:
        """Opt fn in to nbytes of dynamic shared memory per block (needed above 48 KiB) and ask for
        the largest shared-memory carveout, so as many blocks fit as the bytes allow."""
        key = (device.index, name)
        if nbytes == 0 or nbytes <= self._shared_limit.get(key, 0):
            return
        if nbytes > _DEFAULT_SHARED_LIMIT:
            _check(
                _driver().cuFuncSetAttribute(fn, _MAX_DYNAMIC_SHARED, nbytes),
                f"cuFuncSetAttribute({name}, max dynamic shared memory {nbytes} B)",
            )
        _check(
            _driver().cuFuncSetAttribute(fn, _SHARED_CARVEOUT, 100),
            f"cuFuncSetAttribute({name}, shared memory carveout 100%)",
        )
        self._shared_limit[key] = nbytes

    def launch(
        self,
        name: str,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args,
        device,
        shared_bytes: int = 0,
    ):
        """args: [(kind, value)], kind in "p" (tensor / address), "i", "q", "f"; shared_bytes:
        dynamic shared memory per block."""
        device = _indexed(device)
        fn = self.function(name, device)
        if getattr(_thread, "device", None) != device.index:  # a thread's first launch here
            _make_current(device)
            _thread.device = device.index
        self._allow_shared(name, device, fn, shared_bytes)
        holders = []
        for kind, value in args:
            if kind == "p" and isinstance(value, torch.Tensor):
                value = value.data_ptr()
            holders.append(_ARG_TYPES[kind](value))
        params = (ctypes.c_void_p * len(holders))(
            *[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in holders]
        )
        stream = torch.cuda.current_stream(device).cuda_stream
        _check(
            _driver().cuLaunchKernel(
                fn, *grid, *block, shared_bytes, ctypes.c_void_p(stream), params, None
            ),
            f"cuLaunchKernel({name})",
        )
