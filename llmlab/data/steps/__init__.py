"""Pipeline steps, one file per method. Importing this package imports every module in it, and each
module registers its steps (`@register`) under the names used in pipeline YAML."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
