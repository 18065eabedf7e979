"""`python -m perf`: the loss sweep (perf/sweep_loss.py), then its report."""

from .sweep_loss import main

if __name__ == "__main__":
    main()
