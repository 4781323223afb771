"""memopt.plan."""
