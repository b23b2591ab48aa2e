"""The GPU check: proves the CUDA engine on a GPU host that has Python, PyTorch with CUDA and a
driver, but neither TVM nor network access.

    python -m gpucheck prepare [--out .gpucheck]        # here: compile, bundle, static checks
    python -m gpucheck run .gpucheck OUT_DIR [--quick]   # on the GPU host: report.json + report.md

Run from the repository root; ``gpucheck`` is not installed with the package. See docs/gpu-check.md.
"""
