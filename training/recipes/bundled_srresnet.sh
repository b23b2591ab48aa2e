#!/usr/bin/env bash
# The bundled SRResNet models' recipe: bundled.sh with ARCH=srresnet and runs/bundled as the run folder
# (RUNS overrides it).
RUNS=${RUNS:-runs/bundled} ARCH=srresnet exec "$(dirname "$0")/bundled.sh" "$@"
