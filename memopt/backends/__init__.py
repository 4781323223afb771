"""memopt.backends."""
