"""The families: the architecture registry, per-family config reading, checkpoint names and loading, the TP plan."""
