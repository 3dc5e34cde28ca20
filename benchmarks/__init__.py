"""Built-in task streams (YAML files here) and the Python builders of their data and models.

Every module in this folder registers its data builders and models on import.
"""
import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
