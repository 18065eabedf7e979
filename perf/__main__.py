"""`python -m perf`: the loss sweep (perf/sweep_loss.py), then its report, then the focal loss sweep."""

import sys

from . import sweep_focal
from .sweep_loss import main

if __name__ == "__main__":
    main()
    # The focal sweep takes the options both sweeps share.
    shared = [a for a in sys.argv[1:] if a == "--quick"]
    if "--device" in sys.argv[1:]:
        shared += sys.argv[sys.argv.index("--device"):sys.argv.index("--device") + 2]
    sweep_focal.main(shared)
    __import__("perf.linear_loss").linear_loss.main(shared)  # issue 13's cases (perf/linear_loss.py)
