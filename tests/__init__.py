"""af2-jax's tests: a package so that test files, the subprocess checks and the benchmarks import what they share as
`tests.helpers` (and the PyTorch reference as `tests.reference`) instead of importing one another."""
