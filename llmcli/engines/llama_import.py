"""llama-cpp-python's ctypes bindings without the rest of its package.

`import llama_cpp` runs the package's __init__, which also imports its high-level `Llama` class and
chat formats (numpy, jinja2 and more): 0.37 s of a 1.6 s cold `generate` on the AMD EPYC host kind
(cProfile), for names llmcli never uses. `bindings()` loads only `llama_cpp.llama_cpp` under a
package object whose other names (`Llama`, `__version__`, ...) load on first use, so code that
imports `llama_cpp` later (llguidance, tests) sees the whole package.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any


def gentle_openmp() -> None:
    """llama.cpp's OpenMP threads spin at every op's barrier (libgomp's default: 300000 spins), so with
    other processes on the cores a spinning thread holds the core its partner needs: 0.4 tok/s with 4
    busy processes on 2 cores. 1000 spins, then sleep: 11 tok/s busy, the same speed idle
    (docs/engines.md, "Every x86 host"). libgomp reads it once, when it is first loaded: by llama_cpp,
    or earlier by torch (whose libgomp.so.1 llama.cpp then shares), so a process that will run both
    (GRPO's llama.cpp rollouts) calls this before importing torch."""
    import os

    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "1000")


def bindings() -> Any:
    """The `llama_cpp` package with its ctypes bindings loaded (ImportError when not installed)."""
    if "llama_cpp" in sys.modules:
        return sys.modules["llama_cpp"]
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.loader is None:
        raise ImportError("No module named 'llama_cpp'")
    package = importlib.util.module_from_spec(spec)  # created, not run: its __init__ is what costs
    sys.modules["llama_cpp"] = package
    try:
        low_level = importlib.import_module("llama_cpp.llama_cpp")
    except BaseException:
        del sys.modules["llama_cpp"]
        raise
    # what the package's `from .llama_cpp import *` gives
    package.__dict__.update({name: value for name, value in vars(low_level).items() if not name.startswith("_")})
    completed = False

    def complete_on_first_use(name: str) -> Any:
        nonlocal completed
        if completed or name.startswith("__") and name not in ("__version__", "__all__"):
            raise AttributeError(f"module 'llama_cpp' has no attribute {name!r}")
        completed = True
        spec.loader.exec_module(package)  # the real __init__, in the same module object
        return getattr(package, name)

    package.__getattr__ = complete_on_first_use  # module-level __getattr__ (PEP 562)
    return package
