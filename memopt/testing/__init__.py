"""memopt.testing."""
