"""What this machine's CPU is, for the default build target: its /proc/cpuinfo flags and the LLVM
CPU name the engine compiles for (kept light: no TVMScript, so loading a cached artifact stays fast)."""

from __future__ import annotations

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
        from .amx import enable_amx

        if enable_amx():  # and only where this process may use the tiles
            return "sapphirerapids"
    return cpu
