"""fastcore5 benchmarks: every op against its anchors, in one run, on the device present.

Shipped with the package, so ``fastcore5 bench`` works from an installed wheel; in a checkout
``python -m bench`` runs the same (bench/ keeps NOTES.md, the results and the pytest-benchmark
wrappers). Each ``bench_<op>.py`` here exposes ``cases(device, quick) -> list[Case]``; the runner
(runner.py) times them all, ``--host`` measures host time (host.py) and ``--train`` end-to-end
training (train.py); ``pytest bench/ --benchmark-only`` runs the same case bodies through
pytest-benchmark.
"""
