"""What every Ray worker process of a run does before it runs anything: defer the parts of Ray
Tune that an organism's actor never uses.

An organism's actor is a Tune ``Trainable``. Importing it runs ``ray/tune/__init__.py``, which
imports the whole of Tune for the driver's sake: the Tuner, the schedulers, the result tables
(``pandas``) and Ray Data (through ``ray.air``). The actor uses none of it. Measured in one
process on the 2-core development machine, after torch: the Trainable's own modules (they still
need ``pyarrow`` for checkpoint storage) take 47 MB of RSS, all of ``ray.tune`` 107 MB; the
difference, about 60 MB, every actor held for its whole life (32 actors: about 2 GB).

``defer`` puts a placeholder in ``sys.modules`` for ``pandas``, ``ray.data`` and ``ray.tune``.
A placeholder knows its name, file and path, so its submodules import as usual (``import
ray.tune.trainable.trainable`` runs that module and its own imports, not ``ray/tune/__init__.py``),
and ``inspect``, which walks ``sys.modules`` asking for ``__file__``, does not wake it. Any other
attribute lookup is answered from the real modules, complete, so nothing is lost, only deferred:

- ``pandas`` and ``ray.data``: the first lookup runs the real package in the placeholder's place.
- ``ray.tune``: a name its ``__init__`` imports from a submodule (``from ray.tune import
  CheckpointConfig``, or the ``ray.tune.Checkpoint`` a restore unpickles) comes from that
  submodule alone, the same object. Tune's own submodules import such names from the package
  while they are half-run themselves, where running the whole ``__init__`` is a circular import;
  and the driver sends a ``ray.tune.Checkpoint`` with every restore, which would otherwise load
  all of Tune in every exploited actor. Any other name runs the real package.

Ray runs ``defer`` in each worker process at start-up (``runtime_env``'s
``worker_process_setup_hook``, set by ``population.run``); the driver keeps ordinary imports.
"""


from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from pathlib import Path

# Packages whose __init__ an organism's actor does not need -> whether a name its __init__
# imports from a submodule is taken from that submodule alone (see the module doc).
DEFERRED = {"pandas": False, "ray.data": False, "ray.tune": True}
HOOK = f"{__name__}.defer"
_lock = threading.RLock()


class DeferredModule(types.ModuleType):
    """A package in ``sys.modules`` whose ``__init__`` has not run yet; see the module doc."""

    def __getattr__(self, attr: str):
        # Called only for what the placeholder itself lacks.
        source = _sources(self).get(attr) if DEFERRED.get(self.__name__) else None
        if source is not None and sys.modules.get(self.__name__) is self:
            value = getattr(importlib.import_module(source), attr)
            setattr(self, attr, value)
            return value
        return getattr(materialize(self), attr)

    def __repr__(self) -> str:
        state = "deferred" if sys.modules.get(self.__name__) is self else "loaded"
        return f"<module {self.__name__!r} ({state})>"


def _sources(placeholder: DeferredModule) -> dict[str, str]:
    """``{name: module}`` for each top-level ``from module import name`` of the package's __init__
    (read, not run)."""
    cached = placeholder.__dict__.get("_deferred_sources")
    if cached is None:
        import ast

        cached = {}
        tree = ast.parse(Path(placeholder.__file__).read_text())
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    cached[alias.asname or alias.name] = node.module
        placeholder.__dict__["_deferred_sources"] = cached
    return cached


def materialize(placeholder: DeferredModule) -> types.ModuleType:
    """Runs ``placeholder``'s real package (once) and returns it. The submodules imported under
    the placeholder stay what they are; the real package gets them as attributes."""
    name = placeholder.__name__
    with _lock:
        real = sys.modules.get(name)
        if real is placeholder or real is None:
            sys.modules.pop(name, None)
            try:
                real = importlib.import_module(name)
            except BaseException:
                sys.modules[name] = placeholder
                raise
            for key, value in vars(placeholder).items():
                if isinstance(value, types.ModuleType) and not hasattr(real, key):
                    setattr(real, key, value)
            parent, _, child = name.rpartition(".")
            if parent and getattr(sys.modules.get(parent), child, None) is placeholder:
                setattr(sys.modules[parent], child, real)
    return real


def defer(names=tuple(DEFERRED)) -> list[str]:
    """Puts a placeholder in ``sys.modules`` for each package in ``names`` not imported yet (or
    not installed); returns the names deferred."""
    deferred = []
    with _lock:
        for name in names:
            if name in sys.modules:
                continue
            spec = importlib.util.find_spec(name)
            if spec is None or spec.submodule_search_locations is None:
                continue
            placeholder = DeferredModule(name)
            placeholder.__spec__ = spec
            placeholder.__loader__ = spec.loader
            placeholder.__file__ = spec.origin
            placeholder.__path__ = list(spec.submodule_search_locations)
            placeholder.__package__ = name
            sys.modules[name] = placeholder
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, placeholder)
            deferred.append(name)
    return deferred


def runtime_env() -> dict:
    """The job's ``runtime_env``: every worker defers the driver's parts of Tune at start-up."""
    return {"worker_process_setup_hook": HOOK}
