"""Built-in strategy plugins: every module in this folder registers itself with ``@register``."""
import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
