"""Fused loss kernels (Triton on GPU, chunked torch elsewhere). Imports torch and triton only.

fused_linear_cross_entropy(hidden, weight, labels, ...)      the loss, never holding the [N, V] logits
reference_linear_cross_entropy(hidden, weight, labels, ...)  the full-logits executable specification
"""

from .linear_cross_entropy import fused_linear_cross_entropy
from .reference import reference_linear_cross_entropy

__all__ = ["fused_linear_cross_entropy", "reference_linear_cross_entropy"]
