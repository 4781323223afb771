"""memopt.analysis."""
