"""The plan store: what a call works out once per call signature and replays
on every later call with that signature. Two kinds of plan are kept here: a
call plan (`op/routes.py`: the front end's checks, the route, the gradients
the forward writes) and a launch plan (`kernels/`: layout, variant, config,
grid). One store, so one `PLANS.clear()` forgets both: a call plan holds the
launch plan it replays."""

# {(what makes the plan, signature...): plan}. A plan depends only on its
# key, so two threads that make one at once make equal plans.
PLANS: dict[tuple, object] = {}
# Beyond this many signatures (a loop whose shapes keep changing: variable
# lengths, box counts) the plans are dropped and made again as calls come:
# each holds a few KB and, where it launches directly, a compiled kernel.
MAX_PLANS = 1024


def remember(key: tuple, plan):
    """`plan`, kept for later calls with signature `key`."""
    if len(PLANS) >= MAX_PLANS:
        PLANS.clear()
    PLANS[key] = plan
    return plan
