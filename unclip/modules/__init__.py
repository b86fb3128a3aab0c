"""The LightningModules of every stage. Importing this package imports each of its modules, so every
built-in stage kind is in :mod:`unclip.registry`: a stage file added here registers with no other edit."""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
