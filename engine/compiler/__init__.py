"""ONNX -> Relax -> integer kernels -> TVM executables: the compile pipeline behind `refqsr-engine compile`."""
