"""`python -m bench`: the benchmark runner that ships in the package (fastcore5/bench/runner.py)."""
import sys

from fastcore5.bench.runner import main

sys.exit(main())
