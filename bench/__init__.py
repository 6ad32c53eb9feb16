"""fastcore5 benchmarks: every op against its anchors, in one run, on the device present.

Each ``bench/bench_<op>.py`` exposes ``cases(device, quick) -> list[Case]``; ``python -m bench``
runs them all (see bench/runner.py) and ``pytest bench/ --benchmark-only`` runs the same
bodies through pytest-benchmark.
"""
