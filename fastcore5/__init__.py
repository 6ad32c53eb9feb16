"""fastcore5: fused GPU kernels for Linear+ReLU, EmbeddingDotBias and SGD with momentum."""
from . import backends, nn, optim, reference
from .backends import use_backend
from .ops.embedding_dot_bias import embedding_dot_bias
from .ops.linear_relu import linear_relu

__version__ = "0.1.0"
__all__ = ["backends", "nn", "optim", "reference", "use_backend", "linear_relu", "embedding_dot_bias"]
