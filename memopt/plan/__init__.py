"""Memory plans and their renderings (tables, JSON, plots, snapshots)."""
