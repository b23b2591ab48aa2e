"""TVM kernels of the engine, written in TIR (each ``PrimFunc`` checked against a PyTorch or numpy twin).

* Integer convs on x86: :mod:`.conv2d_int8` (AVX2 u8 x s8, int8-pair, int16 and low-bit variants,
  AVX-VNNI and AVX-512), public API :mod:`.conv_int8_avx2`, layouts and exactness bounds
  :mod:`.layouts`, tensor intrinsics :mod:`.x86_intrin` (throughput bench:
  ``python -m refqsr_engine.benchmarks.conv_int8``).
* The fused quantized conv the graphs call (float in, float out, integer arithmetic inside):
  :mod:`.qconv_fused`, and its Intel AMX variant :mod:`.qconv_amx`.
* Float convs on Intel AMX bf16 tiles (fp32-grade by splitting): :mod:`.conv_amx_bf16`; AMX
  support (tile configuration, permission) :mod:`.amx`.
* CUDA integer convs (dp4a, int4 tensor cores) with CPU twins: :mod:`.conv2d_cuda`; building and
  inspecting CUDA code with ``nvcc``, with or without a GPU: :mod:`.cuda_toolchain`.
* ClustBlock clustering (:mod:`.cluster_kernels`) and RefER matching and warping
  (:mod:`.refer_kernels`), with shared build helpers in :mod:`.tir_build`.
* The host CPU and the default ``-mcpu``: :mod:`.host_cpu`.
"""
