"""The machinery behind `memopt.fit` (memopt/fit.py, the public function and its
checks): `fake` (the model and optimizer on fake tensors), `probe` (planning one size),
`search` (which sizes to probe), `floor` (the error when none fits, with the
smaller size of the other dimension that does)."""
