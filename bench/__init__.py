"""The checkout's benchmark folder: ``python -m bench`` (a shim for ``fastcore5 bench``), the
pytest-benchmark wrappers (test_bench.py), the performance log (NOTES.md) and the results.

The runner, the cases and the anchors ship inside the package, in fastcore5/bench/, so that
``fastcore5 bench`` works from an installed wheel too.
"""
