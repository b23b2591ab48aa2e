"""The TVM runtime without the TVM compiler: loads compiled artifacts with ``libtvm_runtime`` and
``tvm_ffi`` alone.

``import tvm`` loads the whole compiler stack (IR, TVMScript, TIR, Relax: seconds), even with
``TVM_USE_RUNTIME_LIB=1``; running a compiled Relax VM library needs none of it. This module loads
the runtime library (and, for CUDA artifacts, TVM's CUDA runtime module) with ctypes and drives
the VM through the functions the libraries register, so a host that runs artifacts needs
``apache-tvm-ffi``, the runtime libraries and numpy, and imports nothing else.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RefQSRError

# Relax VM allocator kinds (tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR)
_POOLED_ALLOCATOR = 2
#: TVM's allocation alignment (kAllocAlignment): compiled kernels may assume it of every tensor
ALIGNMENT = 64
_DEVICE_TYPES = {"cpu": 1, "cuda": 2}
#: where to find the runtime libraries instead of the installed TVM wheel (a bundled runtime)
LIB_DIR_ENV = "REFQSR_ENGINE_TVM_LIB"

_loaded: dict[str, Any] = {}


#: Set by a process that only runs artifacts (the CLI, when it does not compile): tvm_ffi then
#: also skips ml_dtypes (about a second to import; bfloat16 and friends, which no artifact's
#: inputs or outputs use). A process that may still compile keeps it, the compiler needs it.
lean_imports = False


def _import_tvm_ffi() -> Any:
    """tvm_ffi, imported without PyTorch: its ``__init__`` imports torch whenever torch is
    installed (seconds of import that a runtime never uses)."""
    if "tvm_ffi" in sys.modules:
        return sys.modules["tvm_ffi"]
    blocked = [m for m in ("torch", *(("ml_dtypes",) if lean_imports else ())) if m not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` raise ImportError
    try:
        import tvm_ffi
    finally:
        for name in blocked:
            del sys.modules[name]
    return tvm_ffi


def runtime_lib_dir() -> Path:
    """The folder holding ``libtvm_runtime.so``: ``$REFQSR_ENGINE_TVM_LIB``, else the installed
    TVM package's ``lib`` folder (found without importing it)."""
    env = os.environ.get(LIB_DIR_ENV)
    if env:
        return Path(env)
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise RefQSRError("the TVM runtime is not installed (pip install apache-tvm)")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _load_library(name: str, mode: int) -> ctypes.CDLL:
    path = runtime_lib_dir() / name
    if not path.is_file():
        raise RefQSRError(f"TVM runtime library {path} is missing")
    try:
        return ctypes.CDLL(str(path), mode=mode)
    except OSError as err:
        raise RefQSRError(f"cannot load {path.name}: {err}") from None


def load_runtime(cuda: bool = False) -> Any:
    """Load the TVM runtime (once per process) and return ``tvm_ffi``. With ``cuda``, also TVM's
    CUDA runtime module; a failure to load it (no ``libcudart``, no driver) is an error that names
    the missing piece, never a silent CPU-only runtime."""
    ffi = _import_tvm_ffi()
    if "runtime" not in _loaded:
        _loaded["runtime"] = _load_library("libtvm_runtime.so", ctypes.RTLD_GLOBAL)
    if cuda and "cuda" not in _loaded:
        try:
            _loaded["cuda"] = _load_library("libtvm_runtime_cuda.so", ctypes.RTLD_GLOBAL)
        except RefQSRError as err:
            raise RefQSRError(f"CUDA artifacts need TVM's CUDA runtime: {err}") from None
    return ffi


def device(kind: str, index: int = 0) -> Any:
    """A device of ``kind`` "cpu" or "cuda"; a GPU that the CUDA runtime cannot see is an error."""
    if kind not in _DEVICE_TYPES:
        raise RefQSRError(f"unknown device kind {kind!r}")
    dev = load_runtime(kind == "cuda").device(kind, index)
    if kind != "cpu" and not _global("runtime.GetDeviceAttr")(_DEVICE_TYPES[kind], index, 0):
        raise RefQSRError(f"no {kind.upper()} device {index} is visible to the TVM runtime on this machine")
    return dev


@functools.cache
def _global(name: str) -> Any:
    func = load_runtime().get_global_func(name, allow_missing=True)
    if func is None:
        raise RefQSRError(f"the TVM runtime lacks {name}")
    return func


def aligned(array: np.ndarray) -> np.ndarray:
    """``array`` C-contiguous at a ``ALIGNMENT``-byte boundary: compiled kernels assume TVM's
    allocation alignment (aligned vector loads fault on a numpy buffer that lacks it)."""
    if array.flags["C_CONTIGUOUS"] and array.ctypes.data % ALIGNMENT == 0:
        return array
    raw = np.empty(array.nbytes + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    out = raw[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def to_device(array: np.ndarray, dev: Any) -> Any:
    """A TVM tensor holding ``array`` on ``dev`` (CPU: shares the buffer when it is aligned)."""
    ffi = load_runtime()
    if dev.dlpack_device_type() == _DEVICE_TYPES["cpu"]:
        return ffi.from_dlpack(aligned(array))
    array = np.ascontiguousarray(array)
    out = empty(array.shape, str(array.dtype), dev)
    _global("runtime.TVMTensorCopyFromBytes")(out, array.ctypes.data_as(ctypes.c_void_p), array.nbytes)
    return out


def empty(shape: tuple[int, ...], dtype: str, dev: Any) -> Any:
    ffi = load_runtime()
    return _global("runtime.TVMTensorAllocWithScope")(ffi.Shape([int(d) for d in shape]), ffi.dtype(dtype), dev, None)


def to_numpy(tensor: Any) -> np.ndarray:
    """A numpy view (CPU) or copy (other devices) of a TVM tensor."""
    if tensor.device.dlpack_device_type() == _DEVICE_TYPES["cpu"]:
        return np.from_dlpack(tensor)
    out = np.empty(tuple(tensor.shape), dtype=str(tensor.dtype))
    _global("runtime.TVMTensorCopyToBytes")(tensor, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
    return out


def view(tensor: Any, shape: tuple[int, ...], dtype: str, byte_offset: int) -> Any:
    """A tensor of ``shape`` sharing ``tensor``'s memory from ``byte_offset`` bytes on (no copy)."""
    ffi = load_runtime()
    return _global("runtime.TVMTensorCreateView")(
        tensor, ffi.Shape([int(d) for d in shape]), ffi.dtype(dtype), byte_offset
    )


def copy_tensor(src: Any, dst: Any) -> None:
    """Copy ``src`` into ``dst`` (same shape and dtype), device to device where both live there."""
    _global("runtime.TVMTensorCopyFromTo")(src, dst)


def load_module(path: str | Path) -> Any:
    """A compiled library (``*.so``)."""
    return load_runtime().load_module(str(path))


class VirtualMachine:
    """A Relax VM over one compiled graph library, on one device (plus the CPU for shape code)."""

    def __init__(self, path: str | Path, dev: Any) -> None:
        self.module = load_module(path)["vm_load_executable"]()
        args = [dev.dlpack_device_type(), dev.index, _POOLED_ALLOCATOR]
        if dev.dlpack_device_type() != _DEVICE_TYPES["cpu"]:
            args += [_DEVICE_TYPES["cpu"], 0, _POOLED_ALLOCATOR]
        self.module["vm_initialization"](*args)
        self.main = self.module["main"]

    def __call__(self, *args: Any) -> list[Any]:
        out = self.main(*args)
        return list(out) if not hasattr(out, "shape") else [out]
