"""Drop-in modules built on the fused ops."""
from .embedding_dot_bias import EmbeddingDotBias
from .linear_relu import LinearReLU
from .mlp import MLP

__all__ = ["LinearReLU", "MLP", "EmbeddingDotBias"]
