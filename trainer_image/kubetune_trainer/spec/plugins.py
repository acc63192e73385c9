"""Platform extensions: the modules named in ``KUBETUNE_PLUGINS`` are imported at start-up.

A plugin module registers what it adds at import — a strategy with
:func:`kubetune_trainer.spec.register_strategy`, a storage scheme with
``kubetune_trainer.storage.register_scheme`` — so the CRD, ``kubetune validate``,
the operator and the trainer all know it.  The list is deployment configuration
(the operator's and the trainer image's environment), set by the platform team;
a FineTuneJob never names a module.
"""

from __future__ import annotations

import importlib
import os
import re

from kubetune_trainer.spec.runtime import ENV_PLUGINS

MODULE_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def plugin_modules(value: str | None = None) -> list[str]:
    """The module names of ``KUBETUNE_PLUGINS`` (comma-separated); a malformed name is a ValueError naming it."""
    raw = os.environ.get(ENV_PLUGINS, "") if value is None else value
    names = [name.strip() for name in raw.split(",") if name.strip()]
    for name in names:
        if not MODULE_PATTERN.match(name):
            raise ValueError(f"{ENV_PLUGINS}: {name!r} is not a Python module name")
    return names


def load_plugins(value: str | None = None) -> list[str]:
    """Import every plugin module (once per process); returns their names."""
    names = plugin_modules(value)
    for name in names:
        importlib.import_module(name)
    return names
