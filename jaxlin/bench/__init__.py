"""Benchmarks: kernels, layers, train step and decode, against references and physical bounds."""
