"""C hot loops, compiled on first use, cached, loaded with ctypes.

``load(source, signatures)`` returns the library built from one C file (``gsnn/kernels.c``: the
organism's decision and learning loops; ``envs/world.c``: the batched world's step), or None
where it cannot be had; callers then use the torch implementation of the same functions. The
environment variable ``GSNN_NATIVE`` chooses:

- ``auto`` (default): use the C kernels on the CPU when a C compiler is found, else warn once
  and use torch;
- ``0``: never (torch only);
- ``1``: always; a missing compiler or a failed build is an error (the test suite sets this, so
  CI proves the C path rather than silently testing the fallback).

The compiler is ``$CC``, else ``cc``, ``gcc`` or ``clang`` on the PATH, with ``-O3 -march=native
-ffp-contract=off`` (no fused multiply-add: the LIF steps round exactly as Norse's; the other
flags, ``-fno-trapping-math -fno-math-errno``, let loops vectorise without changing a result). The library
lands in ``$GSNN_CACHE_DIR`` (default ``$XDG_CACHE_HOME/gsnn`` or ``~/.cache/gsnn``) under a name
made from the source, the flags, the compiler and this CPU's model and feature flags, so a home
directory shared by different machines never loads a build made for another CPU. Processes that
start together (a population's actors) build it once: the first takes a file lock and compiles,
the others wait for it and load the result. A build takes about a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-std=gnu11", "-fPIC", "-shared")


class NativeUnavailable(RuntimeError):
    """GSNN_NATIVE=1 and the C kernels could not be built or loaded."""


_loaded: dict[Path, ctypes.CDLL | None] = {}
_disabled = 0  # depth of torch_only() blocks


@contextlib.contextmanager
def torch_only():
    """Inside this block ``load`` returns None: every kernel takes its torch implementation
    (the tests and benchmarks compare the two this way)."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def mode() -> str:
    value = os.environ.get("GSNN_NATIVE", "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise NativeUnavailable(f"GSNN_NATIVE: must be auto, 0 or 1, got {value!r}")
    return value


def load(source: Path, signatures: dict) -> ctypes.CDLL | None:
    """The library built from ``source`` with ``signatures`` (function name -> (argument ctypes,
    result ctype)) applied, or None (see the module docstring). Built at most once per process."""
    if _disabled:
        return None
    library = _loaded.get(source, False)  # keyed by the caller's own object: a hit costs no Path compare
    if library is not False:
        return library
    key, source = source, Path(source)
    wanted = mode()
    library = None
    if wanted != "0":
        try:
            library = ctypes.CDLL(str(_build(source)))
            for name, (argtypes, restype) in signatures.items():
                function = getattr(library, name)
                function.argtypes, function.restype = argtypes, restype
        except (OSError, AttributeError, subprocess.SubprocessError, NativeUnavailable) as error:
            if wanted == "1":
                raise NativeUnavailable(f"GSNN_NATIVE=1 but {source.name} is unavailable: {error}") from None
            warnings.warn(f"gsnn: C kernels of {source.name} unavailable ({error}); using the slower torch path",
                          RuntimeWarning, stacklevel=2)
            library = None
    _loaded[key] = library
    return library


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    if os.environ.get("GSNN_CACHE_DIR"):
        return Path(os.environ["GSNN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gsnn"


def _cpu_signature() -> str:
    """This CPU's model and feature flags (what -march=native compiles for)."""
    try:
        wanted = {"model name", "flags", "Features", "CPU part", "vendor_id"}
        lines = []
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if key in wanted:
                lines.append(line)
            elif not line.strip() and lines:
                break  # the first processor describes them all
        if lines:
            return "\n".join(lines)
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def library_path(source: Path, cc: str) -> Path:
    key = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(FLAGS).encode(), cc.encode(), _cpu_signature().encode(),
                 platform.machine().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"{source.stem}-{key.hexdigest()[:20]}.so"


def _build(source: Path) -> Path:
    cc = compiler()
    if cc is None:
        raise NativeUnavailable("no C compiler (set CC, or install gcc)")
    target = library_path(source, cc)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # one builder per machine; the rest wait here
        if target.exists():
            return target
        handle, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".so.tmp", dir=target.parent)
        os.close(handle)
        try:
            out = subprocess.run([cc, *FLAGS, "-o", tmp, str(source), "-lm"], capture_output=True, text=True,
                                 timeout=300)
            if out.returncode != 0:
                raise NativeUnavailable(f"{Path(cc).name} failed: {out.stderr.strip()[-1000:]}")
            os.replace(tmp, target)  # atomic: a reader sees no file or a whole one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target

