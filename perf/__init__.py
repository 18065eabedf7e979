"""Performance sweeps of fused_sigxent against PyTorch eager and torch.compile."""
