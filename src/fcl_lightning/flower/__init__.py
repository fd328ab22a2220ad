"""Run the federation on Flower (``pip install -e ".[flower]"``): a ``ServerApp`` and a
``ClientApp`` that drive the same client step, aggregator and feature routing as the in-process
loop, across processes and machines. See the README section "Running across machines"."""

import os as _os

# Telemetry off unless the user turns it on (the Flower processes themselves read the same
# variable: export FLWR_TELEMETRY_ENABLED=0 before starting flower-superlink / flower-supernode).
_os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
