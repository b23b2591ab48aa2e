"""TVM kernels: integer convs (AVX2 u8 x s8, low-bit), later ClustBlock and RefER kernels."""
