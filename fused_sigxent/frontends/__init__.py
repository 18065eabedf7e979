"""The front ends: the public losses and modules, which check and translate
their arguments into one call of a route (`op/routes.py`)."""
