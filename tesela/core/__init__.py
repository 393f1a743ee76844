"""Core types at the bottom of the import graph: the batch, its plan, the forward context, the KV pool.

Nothing here imports any other part of tesela (docs/architecture.md, "The import rule").
"""
