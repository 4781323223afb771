"""memopt.optim."""
