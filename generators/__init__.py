"""Training populations: the one-model training path and the submitit launcher."""
