"""memopt.graph."""
