"""Run the federation on Flower (``pip install -e ".[flower]"``): a ``ServerApp`` and a
``ClientApp`` that drive the same client step, aggregator and feature routing as the in-process
loop, across processes and machines. See the README section "Running across machines"."""
