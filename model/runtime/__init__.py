"""The serving runtime: the runner, the score reducer, the output kinds table, invariance, prefix sharing."""
