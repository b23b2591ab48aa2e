"""What this machine's CPU is, for the default build target: its /proc/cpuinfo flags and the LLVM
CPU name the engine compiles for (kept light: no TVMScript, so loading a cached artifact stays fast)."""

from __future__ import annotations

import ctypes
import functools

# what LLVM's "sapphirerapids" lets code use beyond the AVX-512 of Ice Lake / Rocket Lake
SAPPHIRE_RAPIDS_FLAGS = frozenset(
    {
        "amx_tile",
        "amx_int8",
        "amx_bf16",
        "avx512_fp16",
        "avx512_bf16",
        "avx_vnni",
        "avx512_vnni",
        "avx512bw",
        "avx512vl",
        "serialize",
        "movdiri",
        "movdir64b",
    }
)
#: LLVM target features of the AMX int8 + bf16 kernels
AMX_FEATURES = ("amx-tile", "amx-int8", "amx-bf16")
#: LLVM target feature -> /proc/cpuinfo flag, for the features the kernels may be built with: an
#: artifact records the flags its target implies and refuses to run on a CPU that lacks one
LLVM_FEATURE_FLAGS = {
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512dq": "avx512dq",
    "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16",
    "avxvnni": "avx_vnni",
    "amx-tile": "amx_tile",
    "amx-int8": "amx_int8",
    "amx-bf16": "amx_bf16",
}
#: /proc/cpuinfo flags of the AMX int8 + bf16 kernels
AMX_FLAGS = frozenset({"amx_tile", "amx_int8", "amx_bf16"})

_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def host_cpu_flags() -> frozenset[str]:
    """The ``flags`` of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def host_mcpu() -> str:
    """The LLVM name of this machine's CPU (what ``-mcpu=native`` means to LLVM), so that the
    default build uses every vector extension the host has (AVX-512, AMX where present); falls
    back to the documented AVX2 baseline when LLVM cannot tell or names a CPU without AVX2."""
    import tvm
    from tvm.target import codegen

    try:
        cpu = str(codegen.llvm_get_system_cpu())
        target = tvm.target.Target({"kind": "llvm", "mcpu": cpu})
        ok = bool(codegen.target_has_features("avx2", target))
        has_amx = all(codegen.target_has_features(f, target) for f in AMX_FEATURES)
    except Exception:  # no LLVM in this TVM build, or a CPU name this LLVM does not know
        return "core-avx2"
    if not ok or cpu == "generic":
        return "core-avx2"
    # Some hypervisors show a Sapphire Rapids as an older model (LLVM said "rocketlake" on a
    # Sapphire Rapids VM): trust the CPU flags for the AMX generation
    if not has_amx and SAPPHIRE_RAPIDS_FLAGS <= host_cpu_flags():
        if enable_amx():  # and only where this process may use the tiles
            return "sapphirerapids"
    return cpu


def host_has_amx() -> bool:
    """Whether this (Linux) CPU has AMX tiles with int8 and bf16."""
    return AMX_FLAGS <= host_cpu_flags()


@functools.cache
def enable_amx() -> bool:
    """Ask Linux for the AMX tile state for this process; True when granted (or already held).

    Call before running any AMX kernel (the runtime does when an artifact uses them)."""
    if not host_has_amx():
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0


def required_cpu_flags(target) -> list[str]:
    """The /proc/cpuinfo flags code built for an LLVM ``target`` may use (asks LLVM)."""
    from tvm.target import codegen

    return sorted(flag for feature, flag in LLVM_FEATURE_FLAGS.items() if codegen.target_has_features(feature, target))
