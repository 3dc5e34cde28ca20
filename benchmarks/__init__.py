"""Built-in task streams (YAML files here) and the Python builders of their data and models."""
from . import tiny_synthetic  # noqa: F401
