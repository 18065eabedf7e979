"""`python -m perf`: the loss sweep (perf/sweep_loss.py) and its report, then
the focal loss sweep (perf/sweep_focal.py) and the fused linear / SigLIP
sweep (perf/linear_loss.py), each with its own CSV and summary."""

import sys

from . import linear_loss, sweep_focal
from .sweep_loss import main

if __name__ == "__main__":
    main()
    # The later sweeps take the options all three share.
    shared = [a for a in sys.argv[1:] if a == "--quick"]
    if "--device" in sys.argv[1:]:
        shared += sys.argv[sys.argv.index("--device"):sys.argv.index("--device") + 2]
    sweep_focal.main(shared)
    linear_loss.main(shared)
