"""Model building blocks: linear layers with fused-weight loading, norms, rotary, activations."""
