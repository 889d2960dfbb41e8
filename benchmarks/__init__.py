"""The benchmarks. Run them as modules from the repository root: ``python -m benchmarks.<name>``
(``_harness`` says where their outputs go)."""
