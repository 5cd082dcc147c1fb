"""grant-broker benchmarks: the broker against its floors (``python -m bench.run``).

Diagnostics beside it: ``python -m bench.hops`` (timestamps at each hop of a
fast-path call, in both processes) and ``python -m bench.frames`` (the fd
channel's layers alone, without the broker).

Not part of the test suite's pass/fail: ``tests/test_bench_smoke.py`` only
checks that the command still runs and reports every figure.
"""
