"""Attention backends, the attention split op and the backend policy."""
