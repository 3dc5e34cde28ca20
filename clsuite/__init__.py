"""clsuite: continual-learning benchmarks for language models."""
__version__ = "0.1.0"
