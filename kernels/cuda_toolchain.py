"""Building TVM CUDA kernels with ``nvcc`` on machines with or without a GPU, and inspecting them.

What TVM 0.27 needs to produce a real CUDA binary (read from the installed package):

* ``tvm.compile`` with a CUDA target calls the C++ ``target.build.cuda``, which emits CUDA C and
  then, **only if** the global function ``ffi.Module.create.cuda`` exists, compiles it through the
  Python hook ``tvm_callback_cuda_compile`` (``tvm/support/nvcc.py``; ``TVM_CUDA_COMPILE_MODE``
  picks ``nvrtc`` -- needs the ``cuda-bindings`` package -- or ``nvcc``, which writes a fatbin)
  and wraps the result in a runnable CUDA module. Without that function TVM silently keeps a
  source-only module.
* ``ffi.Module.create.cuda`` is registered by ``libtvm_runtime_cuda.so``, which ``import tvm``
  loads with ``RTLD_LOCAL`` and, if that fails, skips without a word
  (``tvm/backend/cuda/__init__.py``). It fails when ``libcuda.so.1`` (the driver) is missing:
  the library links ``cuDeviceGetName cuFuncSetAttribute cuGetErrorName cuGetErrorString
  cuLaunchKernelEx cuModuleGetFunction cuModuleLoadData cuModuleUnload cuTensorMapEncodeTiled``.

So on a build machine without the driver :func:`ensure_cuda_build_env` compiles a tiny stub ``libcuda.so.1``
(soname ``libcuda.so.1``; every entry point returns ``CUDA_ERROR_STUB_LIBRARY``) into a cache
directory, preloads it with ``RTLD_GLOBAL`` (the dynamic linker then satisfies the runtime
library's ``DT_NEEDED`` with it), puts the directory on ``LD_LIBRARY_PATH`` for child processes,
and (re)loads ``libtvm_runtime_cuda.so`` the way ``import tvm`` does. Nothing is ever launched
through the stub: kernels are built and inspected, not run. Where a real driver is present it is
used and no stub is made.

:func:`build_cuda` records the CUDA C source and the fatbin that the hook returned (this is also
the proof that a binary was built), and :func:`device_code` turns them into PTX text (``nvcc
--ptx`` of the same source) plus SASS when ``cuobjdump`` is installed (CPU-only installs often lack it).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tvm is imported lazily: the driver stub must be loadable before it matters
    import tvm

__all__ = [
    "SUPPORTED_ARCHS",
    "CudaBuildInfo",
    "CudaToolchainError",
    "build_cuda",
    "build_info",
    "cuda_tool",
    "parse_res_usage",
    "parse_sass",
    "sass_counts",
    "cuda_target",
    "device_code",
    "ensure_cuda_build_env",
    "has_cuda_device",
    "nvcc_available",
]

SUPPORTED_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")

_DRIVER_SYMBOLS = (
    "cuDeviceGetName",
    "cuFuncSetAttribute",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuLaunchKernelEx",
    "cuModuleGetFunction",
    "cuModuleLoadData",
    "cuModuleUnload",
    "cuTensorMapEncodeTiled",
)
_STUB_MARKER = "refqsr_libcuda_stub"

# Stubs return CUDA_ERROR_STUB_LIBRARY (34), the code NVIDIA's own link stubs report.
_STUB_SOURCE = r"""
typedef int CUresult;
#define STUB_ERR 34
int refqsr_libcuda_stub = 1;
static const char kName[] = "CUDA_ERROR_STUB_LIBRARY";
static const char kMsg[] = "refqsr_engine libcuda stub: no CUDA driver here (build-only)";
CUresult cuGetErrorName(CUresult e, const char **s) { (void)e; if (s) *s = kName; return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { (void)e; if (s) *s = kMsg; return 0; }
CUresult cuInit(unsigned flags) { (void)flags; return STUB_ERR; }
CUresult cuDeviceGetCount(int *n) { if (n) *n = 0; return STUB_ERR; }
CUresult cuDeviceGetName(char *s, int len, int dev) { (void)dev; if (s && len > 0) s[0] = 0; return STUB_ERR; }
CUresult cuFuncSetAttribute(void *f, int a, int v) { (void)f; (void)a; (void)v; return STUB_ERR; }
CUresult cuLaunchKernelEx(const void *c, void *f, void **p, void **e) {
    (void)c; (void)f; (void)p; (void)e; return STUB_ERR; }
CUresult cuModuleGetFunction(void **f, void *m, const char *n) { (void)m; (void)n; if (f) *f = 0; return STUB_ERR; }
CUresult cuModuleLoadData(void **m, const void *img) { (void)img; if (m) *m = 0; return STUB_ERR; }
CUresult cuModuleUnload(void *m) { (void)m; return STUB_ERR; }
CUresult cuTensorMapEncodeTiled(void *t, ...) { (void)t; return STUB_ERR; }
"""


class CudaToolchainError(RuntimeError):
    """The CUDA build environment is incomplete (no nvcc, no C compiler, runtime not loadable)."""


def nvcc_available() -> bool:
    return shutil.which("nvcc") is not None


def _check_arch(arch: str) -> str:
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"arch must be one of {SUPPORTED_ARCHS}, got {arch!r}")
    return arch


# ----------------------------------------------------------------------------------------------
# driver: real, or the stub


def _load_driver() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None


def _is_stub(lib: ctypes.CDLL) -> bool:
    return hasattr(lib, _STUB_MARKER)


def has_cuda_device() -> bool:
    """True when a real CUDA driver is installed and reports at least one device."""
    lib = _load_driver()
    if lib is None or _is_stub(lib):
        return False
    count = ctypes.c_int(0)
    try:
        return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except AttributeError:
        return False


def _cache_dir() -> Path:
    root = os.environ.get("REFQSR_ENGINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "refqsr_engine"
    )
    return Path(root) / "cuda_stub"


def _build_stub() -> Path:
    """Compile the stub once per source version (the file name carries its hash)."""
    digest = hashlib.sha256(_STUB_SOURCE.encode()).hexdigest()[:12]
    out_dir = _cache_dir() / digest
    lib = out_dir / "libcuda.so.1"
    if lib.exists():
        return lib
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise CudaToolchainError("no C compiler (cc/gcc) to build the libcuda.so.1 stub")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        src, tmp_lib = Path(tmp) / "stub.c", Path(tmp) / "libcuda.so.1"
        src.write_text(_STUB_SOURCE)
        cmd = [cc, "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o", str(tmp_lib), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CudaToolchainError(f"building the libcuda stub failed: {' '.join(cmd)}\n{proc.stderr}")
        os.replace(tmp_lib, lib)  # atomic: concurrent builders never see a partial file
    return lib


def _prepend_env_path(var: str, path: str) -> None:
    parts = [p for p in os.environ.get(var, "").split(os.pathsep) if p]
    if path not in parts:
        os.environ[var] = os.pathsep.join([path] + parts)


def _load_tvm_cuda_runtime() -> None:
    """Load ``libtvm_runtime_cuda.so`` as ``tvm.backend.cuda.register_backend`` does, if
    ``import tvm`` ran before the driver (or stub) was loadable and skipped it."""
    import tvm  # noqa: F401  (also registers tvm_callback_cuda_compile via tvm.support.nvcc)
    import tvm_ffi
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None:
        return
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
        )
    except (OSError, FileNotFoundError, RuntimeError) as err:
        raise CudaToolchainError(f"cannot load TVM's CUDA runtime (libtvm_runtime_cuda.so): {err}") from err
    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        raise CudaToolchainError("libtvm_runtime_cuda.so loaded but ffi.Module.create.cuda is not registered")


_ENV_READY = False


def ensure_cuda_build_env() -> None:
    """Make ``tvm.compile`` produce real CUDA binaries with nvcc (idempotent).

    Sets ``TVM_CUDA_COMPILE_MODE=nvcc`` unless the caller chose a mode, provides the driver stub
    when no ``libcuda.so.1`` exists, and makes sure TVM's CUDA runtime module is registered.
    Raises :class:`CudaToolchainError` when nvcc or a C compiler is missing.
    """
    global _ENV_READY
    if _ENV_READY:
        return
    if not nvcc_available():
        raise CudaToolchainError("nvcc is not on PATH: CUDA kernels cannot be built here")
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    if _load_driver() is None:
        stub = _build_stub()
        ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
        _prepend_env_path("LD_LIBRARY_PATH", str(stub.parent))
    _load_tvm_cuda_runtime()
    _ENV_READY = True


# ----------------------------------------------------------------------------------------------
# target, build, inspection


def cuda_target(arch: str = "sm_80") -> tvm.target.Target:
    """``tvm.target.Target`` for CUDA ``arch`` (one of :data:`SUPPORTED_ARCHS`), LLVM host."""
    import tvm

    _check_arch(arch)
    return tvm.target.Target(
        {"kind": "cuda", "arch": arch, "max_num_threads": 1024, "thread_warp_size": 32, "host": {"kind": "llvm"}}
    )


@dataclass
class CudaBuildInfo:
    """What one :func:`build_cuda` call produced besides the executable."""

    arch: str
    source: str  # CUDA C emitted by TVM
    binary: bytes  # what tvm_callback_cuda_compile returned (fatbin with nvcc, cubin with nvrtc)
    seconds: float  # wall time of tvm.compile, nvcc included
    ptx: str | None = None  # filled lazily by device_code


_BUILD_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _capture_cuda_compile(sink: list):
    """Wrap ``tvm_callback_cuda_compile`` so the (source, binary) pairs it handles are recorded."""
    import tvm_ffi

    name = "tvm_callback_cuda_compile"
    original = tvm_ffi.get_global_func(name)

    def hook(code, *rest):
        binary = original(code, *rest)
        sink.append((str(code), bytes(binary)))
        return binary

    tvm_ffi.register_global_func(name, hook, override=True)
    try:
        yield
    finally:
        tvm_ffi.register_global_func(name, original, override=True)


def build_cuda(mod_or_sch, arch: str = "sm_80") -> tvm.runtime.Executable:
    """Compile a scheduled ``PrimFunc``, ``IRModule`` or ``tvm.s_tir.Schedule`` for CUDA ``arch``.

    Returns the ``tvm.runtime.Executable``; :func:`build_info` / :func:`device_code` give its
    CUDA source, binary and PTX. Raises :class:`CudaToolchainError` if TVM did not compile a
    device binary (the silent source-only fallback).
    """
    import tvm

    _check_arch(arch)
    ensure_cuda_build_env()
    if isinstance(mod_or_sch, tvm.s_tir.Schedule):
        mod_or_sch = mod_or_sch.mod
    if isinstance(mod_or_sch, tvm.tirx.PrimFunc):
        mod_or_sch = tvm.IRModule({"main": mod_or_sch.with_attr("global_symbol", "main")})
    target = cuda_target(arch)
    compiled: list = []
    start = time.perf_counter()
    with target, _capture_cuda_compile(compiled):
        exe = tvm.compile(mod_or_sch, target=target)
    seconds = time.perf_counter() - start
    if not compiled:
        raise CudaToolchainError("tvm.compile kept CUDA source only (ffi.Module.create.cuda missing?)")
    source, binary = compiled[-1]
    _BUILD_INFO[exe] = CudaBuildInfo(arch, source, binary, seconds)
    return exe


def build_info(executable: tvm.runtime.Executable) -> CudaBuildInfo:
    """The :class:`CudaBuildInfo` of an executable made by :func:`build_cuda`."""
    try:
        return _BUILD_INFO[executable]
    except KeyError:
        raise ValueError("not an executable built by cuda_toolchain.build_cuda") from None


def _compile_ptx(source: str, arch: str) -> str:
    from tvm.support import nvcc

    with cuda_target(arch):
        ptx = nvcc.compile_cuda(source, target_format="ptx", arch=arch, compiler="nvcc")
    return bytes(ptx).decode()


def cuda_tool(name: str) -> str | None:
    """Path of a CUDA binary tool (``cuobjdump``, ``nvdisasm``): on ``PATH``, beside ``nvcc``, or
    in the ``nvidia-cuda-cuobjdump`` / ``nvidia-cuda-nvdisasm`` wheels (``nvidia/cu*/bin``)."""
    found = shutil.which(name)
    if found:
        return found
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent / name)
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(Path(root).glob(f"*/bin/{name}"))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def sass_tools() -> tuple[str, str] | None:
    """(cuobjdump, nvdisasm) when both are installed: cuobjdump runs nvdisasm to disassemble, and
    fails without it."""
    tool, disasm = cuda_tool("cuobjdump"), cuda_tool("nvdisasm")
    return (tool, disasm) if tool and disasm else None


def _cuobjdump(binary: bytes, option: str) -> str | None:
    tools = sass_tools()
    if tools is None:
        return None
    tool, disasm = tools
    # the wheels' bin folders are not on PATH: tell cuobjdump where nvdisasm is
    env = {**os.environ, "NVDISASM_PATH": os.path.dirname(disasm)}
    env["PATH"] = os.path.dirname(disasm) + os.pathsep + env.get("PATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.fatbin")
        with open(path, "wb") as f:
            f.write(binary)
        proc = subprocess.run([tool, option, path], capture_output=True, text=True, env=env)
    return proc.stdout if proc.returncode == 0 else None


def _sass(binary: bytes) -> str | None:
    return _cuobjdump(binary, "-sass")


#: SASS opcodes counted per kernel: tensor-core MMAs (integer, half), the dp4a dot product
#: (``IDP.4A``), local memory (register spills: ``LDL``/``STL``), shared and global memory, barriers
SASS_OPCODES = ("IMMA", "HMMA", "IDP", "LDL", "STL", "LDS", "STS", "LDSM", "LDGSTS", "LDG", "STG", "BAR")
_SASS_FUNC = re.compile(r"^\s*Function : (\S+)", re.M)
_SASS_INSN = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", re.M)


def parse_sass(dump: str) -> dict[str, dict[str, int]]:
    """``cuobjdump -sass`` text -> ``{kernel: {opcode: count, "total": n}}`` for
    :data:`SASS_OPCODES` (the opcode without its modifiers: ``IMMA.16832.U8.S8`` counts as IMMA)."""
    out: dict[str, dict[str, int]] = {}
    starts = [(m.start(), m.group(1)) for m in _SASS_FUNC.finditer(dump)]
    for i, (pos, name) in enumerate(starts):
        body = dump[pos : starts[i + 1][0] if i + 1 < len(starts) else len(dump)]
        ops = _SASS_INSN.findall(body)
        counts = {op: 0 for op in SASS_OPCODES}
        for op in ops:
            if op in counts:
                counts[op] += 1
        counts["total"] = len(ops)
        prev = out.get(name)
        out[name] = counts if prev is None else {k: prev[k] + counts[k] for k in counts}
    return out


_RES_FUNC = re.compile(r"^\s*Function (\S+):\s*\n\s*(.*)$", re.M)
#: ``cuobjdump -res-usage`` fields kept per kernel
RESOURCES = {"REG": "registers", "STACK": "stack_bytes", "SHARED": "shared_bytes", "LOCAL": "local_bytes"}


def parse_res_usage(dump: str) -> dict[str, dict[str, int]]:
    """``cuobjdump -res-usage`` text -> ``{kernel: {"registers": n, "stack_bytes": n,
    "shared_bytes": n, "local_bytes": n}}`` (per thread: registers, stack, local memory; per block:
    static shared memory)."""
    out = {}
    for name, fields in _RES_FUNC.findall(dump):
        values = dict(f.split(":", 1) for f in fields.split() if ":" in f)
        out[name] = {key: int(values[field]) for field, key in RESOURCES.items() if field in values}
    return out


def sass_counts(binary: bytes) -> dict[str, dict[str, int]] | None:
    """Per-kernel SASS opcode counts of a fatbin / cubin (:func:`parse_sass`) with each kernel's
    resource usage (:func:`parse_res_usage`), or None when ``cuobjdump`` is not installed (see
    :func:`cuda_tool`) or cannot read ``binary``."""
    dump = _sass(binary)
    if dump is None:
        return None
    counts = parse_sass(dump)
    for name, res in parse_res_usage(_cuobjdump(binary, "-res-usage") or "").items():
        if name in counts:
            counts[name].update(res)
    return counts


def device_code(executable: tvm.runtime.Executable, sass: bool = True) -> str:
    """PTX of the kernel(s) in ``executable`` (nvcc ``--ptx`` of the exact CUDA source TVM built),
    followed by the SASS of the built binary when ``cuobjdump`` is available (:func:`cuda_tool`)
    and ``sass``."""
    info = build_info(executable)
    if info.ptx is None:
        info.ptx = _compile_ptx(info.source, info.arch)
    text = info.ptx
    if sass:
        dump = _sass(info.binary)
        if dump:
            text += "\n// ---- SASS (cuobjdump -sass) ----\n" + dump
    return text
