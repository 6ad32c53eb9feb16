"""`python -m fastcore5 ...` is the `fastcore5` command."""
import sys

from .cli import main

sys.exit(main())
