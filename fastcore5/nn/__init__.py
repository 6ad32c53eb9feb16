"""Drop-in modules built on the fused ops."""
from .linear_relu import LinearReLU

__all__ = ["LinearReLU"]
