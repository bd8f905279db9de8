"""Fused loss kernels (Triton on GPU, chunked torch elsewhere). Imports torch and triton only."""
