"""fastcore5: fused GPU kernels for Linear+ReLU, EmbeddingDotBias and SGD with momentum."""
import sys
import warnings
from pathlib import Path

from . import backends, cpu_cache, nn, optim, reference
from .backends import use_backend
from .ops.embedding_dot_bias import embedding_dot_bias
from .ops.linear_relu import linear_relu
from .ops.mlp import mlp

__version__ = "0.1.0"
__all__ = ["backends", "cpu_cache", "nn", "optim", "reference", "use_backend", "linear_relu", "mlp", "embedding_dot_bias"]

# Our own commands print this as their one-line error and exit 2.
_COMMANDS = {"fastcore5", "bench"}


def _started_as_our_command() -> bool:
    argv = getattr(sys, "orig_argv", sys.argv)
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1] in _COMMANDS
    return Path(sys.argv[0]).stem == "fastcore5" if sys.argv else False


def _warn_about_bad_environment() -> None:
    """Report a FASTCORE5_BACKEND that names no backend once, at import, pointing at the importing
    line. A warning rather than an exception: importing must keep working (tools that only inspect
    the package, code that picks a backend with use_backend), and every op still raises
    BackendConfigError with the same message when it would have read the variable."""
    try:
        backends.check_environment()
    except backends.BackendConfigError as err:
        if not _started_as_our_command():
            warnings.warn(f"{err} (fastcore5's ops raise BackendConfigError until then)", UserWarning, stacklevel=3)


_warn_about_bad_environment()
