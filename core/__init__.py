"""refqsr-engine: RefQSR reference-based quantized x4 super-resolution, compiled with Apache TVM."""

__version__ = "0.1.0"
