"""Intel AMX (Advanced Matrix Extensions) support shared by the AMX kernels.

AMX adds eight 1 KiB tile registers (``tmm0..7``, up to 16 rows x 64 bytes) and a matrix unit:
``tdpbsud``/``tdpbusd`` multiply-accumulate a 16 x 64 int8 tile by a 16 x 64 one in VNNI order
into a 16 x 16 int32 tile (16,384 MACs per instruction, 16x what ``vpdpbusd zmm`` does per
instruction), ``tdpbf16ps`` the same for bf16 pairs into fp32.

Two things are needed before a tile instruction runs, or it raises SIGILL:

* Linux must have granted this *process* the AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM,
  XFEATURE_XTILEDATA)``, :func:`enable_amx`; once per process, idempotent);
* each *thread* must load a tile configuration (``ldtilecfg``), which the kernels do at the start
  of every parallel task (:func:`tile_config_bytes` is the 64-byte palette they store).

The kernels name tile registers by immediates (``llvm.x86.tileloadd64`` & co. without the
``.internal`` shape operands), so LLVM needs no tile register allocation.
"""

from __future__ import annotations

from .host_cpu import AMX_FEATURES, AMX_FLAGS, enable_amx, host_has_amx  # noqa: F401 - re-exported

# LLVM intrinsics (tile numbers are i8 immediates)
LDTILECFG = "llvm.x86.ldtilecfg"
TILERELEASE = "llvm.x86.tilerelease"
TILEZERO = "llvm.x86.tilezero"
TILELOAD = "llvm.x86.tileloadd64"
TILESTORE = "llvm.x86.tilestored64"
TDPBSUD = "llvm.x86.tdpbsud"  # C[m][n] += sum_k s8(A[m][k]) * u8(B[k/4][4n + k%4])
TDPBF16PS = "llvm.x86.tdpbf16ps"  # the same for bf16 pairs into fp32


def target_has_amx(target) -> bool:
    """Whether an LLVM target may use the AMX kernels."""
    import tvm
    from tvm.target import codegen

    if isinstance(target, dict):
        target = tvm.target.Target(target)
    return target.kind.name == "llvm" and all(codegen.target_has_features(f, target) for f in AMX_FEATURES)


def palette_byte(b):
    """Byte ``b`` (a TIR index) of the tile configuration every AMX kernel here loads: palette 1,
    tiles 0..7 of 16 rows x 64 bytes (byte 0 palette, 16 + 2i the bytes per row of tile i, 48 + i
    its rows). For use inside TVMScript: ``cfg[b] = amx.palette_byte(b)``."""
    from tvm import tirx

    u8 = lambda v: tirx.const(v, "uint8")  # noqa: E731
    return tirx.if_then_else(
        b == 0,
        u8(1),
        tirx.if_then_else(
            tirx.all(b >= 16, b < 32, b % 2 == 0), u8(64), tirx.if_then_else(tirx.all(b >= 48, b < 56), u8(16), u8(0))
        ),
    )


# --- the 2 x 2 register blocking every AMX kernel here uses (TVMScript macros) ------------------
# tmm0..3: accumulators C[i][j] (i: A tile, j: B tile); tmm4, tmm5: A tiles; tmm6, tmm7: B tiles.

from tvm.script import tirx as T  # noqa: E402 - the macros below need it; the rest of this module does not


@T.macro
def zero_acc():
    for z in T.unroll(4):
        T.evaluate(T.call_llvm_intrin("void", TILEZERO, T.int8(z)))


@T.macro
def load_a(a0, a1, stride):
    """A tiles (16 rows each, ``stride`` bytes apart) into tmm4, tmm5."""
    T.evaluate(T.call_llvm_intrin("void", TILELOAD, T.int8(4), a0, T.int64(stride)))
    T.evaluate(T.call_llvm_intrin("void", TILELOAD, T.int8(5), a1, T.int64(stride)))


@T.macro
def load_b_and_multiply(b0, b1, stride, product):
    """B tiles into tmm6, tmm7, then C[i][j] += A_i . B_j with ``product`` (TDPBSUD, TDPBF16PS)."""
    T.evaluate(T.call_llvm_intrin("void", TILELOAD, T.int8(6), b0, T.int64(stride)))
    T.evaluate(T.call_llvm_intrin("void", TILELOAD, T.int8(7), b1, T.int64(stride)))
    T.evaluate(T.call_llvm_intrin("void", product, T.int8(0), T.int8(4), T.int8(6)))
    T.evaluate(T.call_llvm_intrin("void", product, T.int8(1), T.int8(4), T.int8(7)))
    T.evaluate(T.call_llvm_intrin("void", product, T.int8(2), T.int8(5), T.int8(6)))
    T.evaluate(T.call_llvm_intrin("void", product, T.int8(3), T.int8(5), T.int8(7)))


@T.macro
def multiply_b(act, n, row, cb, pb, kw, stride, product):
    """:func:`load_b_and_multiply` with the B tiles read from packed activations
    ``act[n][row][group][column]`` (one 4-byte VNNI word per element; a tile's 16 rows are the
    16 groups of K block ``cb``): pixels ``pb * 32 + kw`` .. + 31, ``stride`` bytes per group."""
    load_b_and_multiply(
        T.address_of(act[n, row, cb * 16, pb * 32 + kw]),
        T.address_of(act[n, row, cb * 16, pb * 32 + 16 + kw]),
        stride,
        product,
    )


@T.macro
def multiply(w, act, n, row, ob, pb, tap, cb, kw, a_stride, b_stride, product):
    """A tiles from packed weights ``w[tap][cb][out][K block]`` (output rows ``ob * 32`` .. + 31,
    ``a_stride`` bytes per row), then :func:`multiply_b`."""
    load_a(T.address_of(w[tap, cb, ob * 32, 0]), T.address_of(w[tap, cb, ob * 32 + 16, 0]), a_stride)
    multiply_b(act, n, row, cb, pb, kw, b_stride, product)


@T.macro
def store_acc(acc, row0, col0, width):
    """tmm0..3 into ``acc`` (4-byte elements, ``width`` per row) at rows ``row0`` .. + 31, columns
    ``col0`` .. + 31 (``access_ptr`` with the tile's extent, so TVM sizes the buffer for it)."""
    for i in T.unroll(2):  # unrolled: tile numbers must be immediates
        for j in T.unroll(2):
            T.evaluate(
                T.call_llvm_intrin(
                    "void",
                    TILESTORE,
                    T.int8(i * 2 + j),
                    acc.access_ptr("w", offset=(row0 + 16 * i) * width + col0 + 16 * j, extent=15 * width + 16),
                    T.int64(width * 4),
                )
            )


@T.macro
def configure(cfg):
    """Fill the 64-byte ``cfg`` with :func:`palette_byte` and load it (each task, each thread)."""
    for b in range(64):
        cfg[b] = palette_byte(b)
    T.evaluate(T.call_llvm_intrin("void", LDTILECFG, T.address_of(cfg[0])))
