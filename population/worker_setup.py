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
``worker_process_setup_hook``, set by ``population.run`` and ``population.experiment``); the
driver keeps ordinary imports.
"""


from __future__ import annotations

import importlib
import importlib.machinery
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

    def __reduce__(self):
        # Pickled by name, as cloudpickle pickles a real module (by reference): the unpickling
        # process gets its own sys.modules entry (placeholder or real).
        return importlib.import_module, (self.__name__,)

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
        tree = ast.parse(Path(placeholder.__file__).read_bytes())
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    cached[alias.asname or alias.name] = node.module
        placeholder.__dict__["_deferred_sources"] = cached
    return cached


def materialize(placeholder: DeferredModule) -> types.ModuleType:
    """Runs ``placeholder``'s real package (once) and returns it. importlib's own per-module lock
    serialises concurrent callers (and detects import cycles between threads); no lock of ours is
    held while the package runs."""
    name = placeholder.__name__
    with _lock:
        if sys.modules.get(name) is placeholder:
            del sys.modules[name]
    try:
        real = importlib.import_module(name)  # waits for another thread's import of it to finish
    except BaseException:
        with _lock:
            sys.modules.setdefault(name, placeholder)
        raise
    with _lock:
        # Every submodule already imported is an attribute of the real package: those imported
        # under the placeholder, and those a failed earlier attempt imported (their parent
        # attribute went to that attempt's discarded module object).
        prefix = name + "."
        for key, value in list(sys.modules.items()):
            child = key[len(prefix):] if key.startswith(prefix) else ""
            if child and "." not in child and isinstance(value, types.ModuleType) and child not in vars(real):
                setattr(real, child, value)
        parent, _, child = name.rpartition(".")
        if parent and getattr(sys.modules.get(parent), child, None) is placeholder:
            setattr(sys.modules[parent], child, real)
    return real


class _PackageFirst:
    """Meta-path finder: a submodule of a placeholder that lends no names (pandas, ray.data) is
    imported only after its package's ``__init__`` has run (pandas' compiled modules need it:
    ``from pandas.api.types import ...`` under the placeholder broke pandas for the process).
    ``create_module`` runs the package, then the submodule as usual, and hands that module back;
    ``exec_module`` gives it back its own spec, which importlib replaced with this finder's."""

    @staticmethod
    def _package(name: str) -> str | None:
        for package, by_name in DEFERRED.items():
            if not by_name and name.startswith(package + ".") and type(sys.modules.get(package)) is DeferredModule:
                return package
        return None

    def find_spec(self, name, path=None, target=None):
        if self._package(name) is None:
            return None
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        package = self._package(spec.name)
        if package is not None:
            materialize(sys.modules[package])
        module = importlib.import_module(spec.name)
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state


_package_first = _PackageFirst()


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
        if deferred and _package_first not in sys.meta_path:
            sys.meta_path.insert(0, _package_first)
    return deferred


def runtime_env() -> dict:
    """The job's ``runtime_env``: every worker defers the driver's parts of Tune at start-up."""
    return {"worker_process_setup_hook": HOOK}
