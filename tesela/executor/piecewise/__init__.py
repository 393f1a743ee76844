"""Piecewise CUDA graphs: capture everything between attention calls, run attention eagerly."""
