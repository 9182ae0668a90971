"""agentd benchmarks: ``python -m bench.latency`` and ``python -m bench.capacity`` (see bench/README.md).

Not part of the test suite: they take minutes, measure real time, and print figures, not verdicts.
"""
