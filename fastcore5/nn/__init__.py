"""Drop-in modules built on the fused ops."""
from .embedding_dot_bias import EmbeddingDotBias
from .linear_relu import LinearReLU

__all__ = ["LinearReLU", "EmbeddingDotBias"]
