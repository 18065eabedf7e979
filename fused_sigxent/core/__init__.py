"""The bottom layer: reduction codes, dtype rules, the backend choice, the plan
store and the broadcast layout; it imports nothing else of the package."""
