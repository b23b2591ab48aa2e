#!/usr/bin/env bash
# The bundled SRResNet models' recipe (their model cards name this file): bundled.sh with ARCH=srresnet
# and the run folder those models were trained in.
RUNS=${RUNS:-runs/bundled} ARCH=srresnet exec "$(dirname "$0")/bundled.sh" "$@"
