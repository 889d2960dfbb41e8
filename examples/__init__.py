"""Examples, run as scripts: ``python examples/<name>.py``. The benchmarks import the shared
Shakespeare model as ``examples.shakespeare_lm``."""
