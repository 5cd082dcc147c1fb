"""grant-broker benchmarks: the broker against its floors (``python -m bench.run``).

Not part of the test suite's pass/fail: ``tests/test_bench_smoke.py`` only
checks that the command still runs and reports every figure.
"""
