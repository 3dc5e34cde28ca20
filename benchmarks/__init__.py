"""Built-in task streams (``streams/*.yaml``), their data builders (``builders``) and models (``models``).

Importing this package registers every built-in data builder and model.
"""
from . import builders, models  # noqa: F401
