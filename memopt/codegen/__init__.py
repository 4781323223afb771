"""memopt.codegen."""
