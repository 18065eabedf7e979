"""The ops: every torch.library registration, the derivatives, and the route table that decides how a loss call runs."""
