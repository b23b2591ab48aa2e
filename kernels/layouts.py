"""Packed tensor layouts of the AVX2 integer conv kernels, and the exactness bounds (numpy only);
also the weight layout of the scheduled float conv (:func:`pack_conv_weights_oc`).

Layouts (``C8 = ceil(C / 8)``, ``O8 = ceil(O / 8)``, ``P = kernel // 2``)::

    activations  [N][C8][H + 2P][W + 2P][8]        uint8 (int16 for the "int16" variant)
    weights      [O8][C8][kh][kw][8 // G][8][G]    int8  (int16 for the "int16" variant)
    output       [N][O8][H][W][8]                   int32

* Activations are **pre-padded** with the activation zero point, so the kernel has no boundary
  branches, and the 8 channels of a group are contiguous: one 4-byte load is 4 consecutive
  input channels of one pixel (the value the kernel broadcasts).
* Weights: ``G`` input channels per multiply group (G = 4 for the u8 x s8 ``vpmaddubsw`` kernels,
  G = 2 for the s16 ``vpmaddwd`` kernel); one ``[8][G]`` tile is 32 bytes = one ymm register
  holding 8 output channels x G input channels, in the order ``vpmaddubsw`` / ``vpmaddwd`` pair them.
* Channel counts that are not multiples of 8 are zero-padded (padded weights are 0, so padded
  input channels contribute nothing; padded output channels are cut by :func:`unpack_output`).

The kernel computes the raw integer sum ``acc[n, o, h, w] = sum a_q * w_q`` over the padded window,
with ``a_q`` the stored uint8 activation (zero point *not* subtracted). Because the border is padded
with the zero point too, the zero-point term is the same constant for every pixel of a channel:
``sum (a_q - z) * w_q = acc - z * sum(w_q[o])`` (see :func:`zero_point_correction`).

Exactness of ``vpmaddubsw`` (u8 x s8 -> pair sums saturated to int16) is a property of the value
ranges, not of the code; :func:`madd_pair_range` / :func:`check_int8_ranges` state it, and
:func:`lowbit_chunk_steps` sizes the int16 accumulation of the low-bit kernel.
"""

from __future__ import annotations

import numpy as np

INT16_MIN, INT16_MAX = -32768, 32767

#: Input channels per multiply group, per kernel variant.
GROUP = {"int8": 4, "int8pair": 4, "lowbit": 4, "int16": 2, "vnni": 4}


def ceil8(c: int) -> int:
    """Channels rounded up to a multiple of 8."""
    return (int(c) + 7) // 8 * 8


def _as_int_array(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        if x.dtype.kind == "f" and np.all(np.isfinite(x)) and np.array_equal(x, np.round(x)):
            x = x.astype(np.int64)
        else:
            raise TypeError(f"{name} must hold integers, got dtype {x.dtype}")
    return x


def pack_activations(x, zero_point: int = 0, kernel: int = 3, dtype: str = "uint8") -> np.ndarray:
    """Pack quantized NCHW activations into ``[N][C8][H+2P][W+2P][8]``, padded with ``zero_point``.

    ``x`` holds the quantized values (0..255). ``dtype`` is ``"uint8"`` for the u8 x s8 kernels
    ("int8", "lowbit") and ``"int16"`` for the exact 16-bit kernel ("int16").
    """
    x = _as_int_array(x, "x")
    if x.ndim != 4:
        raise ValueError(f"activations must be NCHW, got shape {x.shape}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be odd and >= 1, got {kernel}")
    zp = int(zero_point)
    if not 0 <= zp <= 255:
        raise ValueError(f"zero_point must be in 0..255, got {zp}")
    if x.size and (x.min() < 0 or x.max() > 255):
        raise ValueError(f"activations must be in 0..255, got [{x.min()}, {x.max()}]")
    n, c, h, w = x.shape
    p = kernel // 2
    c8 = ceil8(c)
    buf = np.full((n, c8, h + 2 * p, w + 2 * p), zp, dtype=dtype)
    buf[:, :c, p : p + h, p : p + w] = x
    return np.ascontiguousarray(buf.reshape(n, c8 // 8, 8, h + 2 * p, w + 2 * p).transpose(0, 1, 3, 4, 2))


def unpack_activations(xp: np.ndarray, channels: int | None = None, kernel: int = 3) -> np.ndarray:
    """Inverse of :func:`pack_activations` (drops the padding)."""
    n, c8, hp, wp, _ = xp.shape
    p = kernel // 2
    x = xp.transpose(0, 1, 4, 2, 3).reshape(n, c8 * 8, hp, wp)[:, :, p : hp - p, p : wp - p]
    return np.ascontiguousarray(x[:, : channels if channels is not None else c8 * 8])


def pack_weights(w, group: int = 4, dtype: str | None = None) -> np.ndarray:
    """Pack OIHW integer weights into ``[O8][I8][kh][kw][8 // group][8][group]``.

    ``group`` = 4 (``dtype`` int8) for the u8 x s8 kernels, 2 (``dtype`` int16) for "int16".
    """
    w = _as_int_array(w, "w")
    if w.ndim != 4:
        raise ValueError(f"weights must be OIHW, got shape {w.shape}")
    if group not in (2, 4):
        raise ValueError(f"group must be 2 or 4, got {group}")
    dtype = dtype or ("int8" if group == 4 else "int16")
    lo, hi = (-128, 127) if dtype == "int8" else (INT16_MIN, INT16_MAX)
    if w.size and (w.min() < lo or w.max() > hi):
        raise ValueError(f"weights must fit {dtype}, got [{w.min()}, {w.max()}]")
    o, i, kh, kw = w.shape
    o8, i8 = ceil8(o), ceil8(i)
    buf = np.zeros((o8, i8, kh, kw), dtype=dtype)
    buf[:o, :i] = w
    # o = og*8 + oi ; i = ig*8 + half*group + ii
    buf = buf.reshape(o8 // 8, 8, i8 // 8, 8 // group, group, kh, kw)
    return np.ascontiguousarray(buf.transpose(0, 2, 5, 6, 3, 1, 4))


def unpack_weights(wp: np.ndarray, out_channels: int | None = None, in_channels: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_weights`."""
    o8, i8, kh, kw, halves, _, group = wp.shape
    w = wp.transpose(0, 5, 1, 4, 6, 2, 3).reshape(o8 * 8, i8 * 8, kh, kw)
    return np.ascontiguousarray(w[: out_channels or o8 * 8, : in_channels or i8 * 8])


def pack_conv_weights_oc(w, oc_tile: int) -> np.ndarray:
    """OIHW float weights -> ``[O/oc_tile][I][kh][kw][oc_tile]`` (the float conv's register tile
    broadcasts ``oc_tile`` adjacent weights per reduction step); ``oc_tile`` must divide O."""
    w = np.asarray(w)
    if w.ndim != 4:
        raise ValueError(f"weights must be OIHW, got shape {w.shape}")
    o, i, kh, kw = w.shape
    if oc_tile < 1 or o % oc_tile:
        raise ValueError(f"oc_tile {oc_tile} does not divide {o} output channels")
    return np.ascontiguousarray(w.reshape(o // oc_tile, oc_tile, i, kh, kw).transpose(0, 2, 3, 4, 1))


def unpack_conv_weights_oc(wp: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_conv_weights_oc`."""
    og, i, kh, kw, t = wp.shape
    return np.ascontiguousarray(wp.transpose(0, 4, 1, 2, 3).reshape(og * t, i, kh, kw))


def unpack_output(y, out_channels: int | None = None) -> np.ndarray:
    """``[N][O8][H][W][8]`` int32 -> NCHW int32 (``out_channels`` drops the channel padding)."""
    y = np.asarray(y.numpy() if hasattr(y, "numpy") else y)
    n, o8, h, w, _ = y.shape
    out = y.transpose(0, 1, 4, 2, 3).reshape(n, o8 * 8, h, w)
    return np.ascontiguousarray(out[:, : out_channels if out_channels is not None else o8 * 8])


def zero_point_correction(w, zero_point: int) -> np.ndarray:
    """Per-output-channel term to subtract from the kernel's sums: ``zero_point * sum(w[o])`` (int64)."""
    w = _as_int_array(w, "w").astype(np.int64)
    return int(zero_point) * w.reshape(w.shape[0], -1).sum(axis=1)


# ----------------------------------------------------------------------------------------------
# exactness of vpmaddubsw (u8 x s8, adjacent pairs summed with int16 saturation)


def madd_pair_range(act_max: int, w_min: int, w_max: int) -> tuple[int, int]:
    """Smallest and largest value one ``vpmaddubsw`` pair sum ``a0*w0 + a1*w1`` can take."""
    act_max, w_min, w_max = int(act_max), int(w_min), int(w_max)
    return 2 * act_max * min(w_min, 0), 2 * act_max * max(w_max, 0)


def int8_is_exact(act_max: int, w_min: int, w_max: int) -> bool:
    """True when no ``vpmaddubsw`` pair sum can saturate (e.g. u7 x s8, or u8 x s7)."""
    lo, hi = madd_pair_range(act_max, w_min, w_max)
    return lo >= INT16_MIN and hi <= INT16_MAX


def check_int8_ranges(act_max: int, w_min: int, w_max: int) -> None:
    """Raise ``ValueError`` unless the "int8" kernel is exact for these operand ranges."""
    if not int8_is_exact(act_max, w_min, w_max):
        lo, hi = madd_pair_range(act_max, w_min, w_max)
        raise ValueError(
            f"vpmaddubsw would saturate: activations 0..{act_max} x weights {w_min}..{w_max} give "
            f"pair sums in [{lo}, {hi}], outside int16. Use 7-bit activations (0..127), 7-bit weights "
            "(-64..63), or the exact 'int16' variant."
        )


def check_int8pair_ranges(act_max: int, w_min: int, w_max: int) -> None:
    """Raise ``ValueError`` unless two ``vpmaddubsw`` pair sums always fit int16 ("int8pair")."""
    if lowbit_chunk_steps(act_max, w_min, w_max) < 2:
        lo, hi = madd_pair_range(act_max, w_min, w_max)
        raise ValueError(
            f"'int8pair' adds two vpmaddubsw results in int16: activations 0..{act_max} x weights "
            f"{w_min}..{w_max} reach [{2 * lo}, {2 * hi}]. Use e.g. u7 x s7 (127, -64..63), u8 x s6 "
            "(255, -32..31) or u6 x s8 (63, -128..127), or the 'int8' variant."
        )


def lowbit_chunk_steps(act_max: int, w_min: int, w_max: int) -> int:
    """How many ``vpmaddubsw`` results can be summed in int16 (``vpaddw``) without overflow."""
    lo, hi = madd_pair_range(act_max, w_min, w_max)
    steps = 1 << 30
    if hi > 0:
        steps = min(steps, INT16_MAX // hi)
    if lo < 0:
        steps = min(steps, -INT16_MIN // -lo)
    return steps


def data_ranges(a_packed: np.ndarray, w_packed: np.ndarray) -> tuple[int, int, int]:
    """(max activation, min weight, max weight) of packed operands."""
    return int(a_packed.max()), int(w_packed.min()), int(w_packed.max())
