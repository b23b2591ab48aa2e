"""One graph build of `refqsr-engine compile`, run in its own process (see compile_model._run_jobs).

    python -m refqsr_engine.engine.compiler.build_worker JSON

with ``JSON`` = ``{"options": {...}, "job": [name, onnx, batch, lib], "result": path}``.

Writes the library to ``lib`` and ``{"report": ..., "device_code": ...}`` to ``result``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    import onnx

    from .compile_model import _GraphBuilder
    from .options import CompileOptions

    spec = json.loads(argv[0])
    opts = CompileOptions(**spec["options"])
    name, onnx_path, batch, lib = spec["job"]
    builder = _GraphBuilder(opts)
    report = builder.build(onnx.load(onnx_path), name, int(batch), Path(lib))
    Path(spec["result"]).write_text(json.dumps({"report": report, "device_code": builder.device_code.get(name)}))


if __name__ == "__main__":
    main(sys.argv[1:])
