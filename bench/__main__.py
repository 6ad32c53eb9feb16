"""`python -m bench`: run every op's benchmark (see bench/runner.py)."""
import sys

from .runner import main

sys.exit(main())
