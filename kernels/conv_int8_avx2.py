"""Public API of the AVX2 integer conv kernels (RefQSR SRResNet 3x3 64->64 convs).

    from refqsr_engine.kernels.conv_int8_avx2 import (
        build_conv2d_int8, build_conv2d_lowbit, pack_activations, pack_weights, unpack_output)

    k = build_conv2d_int8(16, 64, 64, 48, 48)                  # "int8": u7 activations x s8 weights
    y = k(pack_activations(x_u8, zp), pack_weights(w_s8))      # [N][O/8][H][W][8] int32 sums
    y = unpack_output(y, 64)                                   # NCHW; minus zero_point_correction(w, zp)
    k.conv_nchw(x_u8, w_s8, zp)                                # the same in one call

Saturation (``vpmaddubsw`` sums u8 x s8 pairs into *saturating* int16; 255*-128*2 = -65280):
the kernels are exact by construction of the operand ranges, which are checked --

* "int8" (default) 7-bit activations 0..127 x s8 weights (pair sums within [-32512, 32258]), or
  u8 x 7-bit weights -64..63 ([-32640, 32130]); same speed, fbgemm's "reduce_range" choice.
* "int8pair" u7 x s7 / u8 x s6 / u6 x s8: two pair sums added in int16, ~1.2-1.4x "int8".
* "int16" full u8 x s8 through ``vpmaddwd`` on widened operands, ~0.65-0.8x "int8".
* "lowbit" u4 x s4 (up to s6 weights): int16 accumulation over whole channel chunks, ~1.3-1.8x.
* "vnni" (not AVX2) full u8 x s8 with ``vpdpbusd`` on CPUs that have it.
* "vnni512" / "lowbit512" (AVX-512 F+BW+VNNI targets, e.g. ``default_target(host_mcpu())``):
  16 output channels per zmm; output ``[N][O/16][H][W][16]``, weights from
  ``kernel.pack_weights`` (or :func:`pack_weights_for`), sums via :func:`unpack_output_lanes`.

See :mod:`.layouts` (packed layouts, bounds), :mod:`.x86_intrin` (tensor intrinsics),
:mod:`.conv2d_int8` (TIR compute, schedule, build); speed: ``python -m
refqsr_engine.benchmarks.conv_int8``.
"""

from .conv2d_int8 import (
    AVX512_VARIANTS,
    VARIANTS,
    Conv2dInt8Kernel,
    Conv2dShape,
    ScheduleConfig,
    build_conv2d_int8,
    build_conv2d_lowbit,
    choose_tile,
    conv2d_compute,
    default_target,
    host_mcpu,
    lanes_of,
    lowbit_chunk_groups,
    schedule_conv2d,
    target_has_avx512_vnni,
)
from .conv2d_int8 import pack_weights as pack_weights_for
from .conv2d_int8 import unpack_output as unpack_output_lanes
from .layouts import (
    check_int8_ranges,
    check_int8pair_ranges,
    int8_is_exact,
    lowbit_chunk_steps,
    madd_pair_range,
    pack_activations,
    pack_weights,
    unpack_activations,
    unpack_output,
    unpack_weights,
    zero_point_correction,
)
from .x86_intrin import (
    PAIRSUM_8,
    PAIRSUM_8_GLOBAL,
    INT8_DOT_8x4,
    INT8_DOT_8x8_PAIR,
    INT16_DOT_8x2,
    LOWBIT512_DOT_16x4_I16,
    LOWBIT_DOT_8x4_I16,
    VNNI512_DOT_16x4,
    VNNI_DOT_8x4,
    host_has_avx512_vnni,
    host_has_vnni,
    register_avx2_intrinsics,
)

__all__ = [
    "AVX512_VARIANTS",
    "VARIANTS",
    "Conv2dInt8Kernel",
    "Conv2dShape",
    "ScheduleConfig",
    "build_conv2d_int8",
    "build_conv2d_lowbit",
    "choose_tile",
    "conv2d_compute",
    "default_target",
    "host_mcpu",
    "lanes_of",
    "lowbit_chunk_groups",
    "schedule_conv2d",
    "target_has_avx512_vnni",
    "pack_weights_for",
    "unpack_output_lanes",
    "check_int8_ranges",
    "check_int8pair_ranges",
    "int8_is_exact",
    "lowbit_chunk_steps",
    "madd_pair_range",
    "pack_activations",
    "pack_weights",
    "unpack_activations",
    "unpack_output",
    "unpack_weights",
    "zero_point_correction",
    "INT8_DOT_8x4",
    "INT8_DOT_8x8_PAIR",
    "INT16_DOT_8x2",
    "LOWBIT_DOT_8x4_I16",
    "PAIRSUM_8",
    "PAIRSUM_8_GLOBAL",
    "VNNI_DOT_8x4",
    "VNNI512_DOT_16x4",
    "LOWBIT512_DOT_16x4_I16",
    "host_has_avx512_vnni",
    "host_has_vnni",
    "register_avx2_intrinsics",
]
