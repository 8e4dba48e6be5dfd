"""Shipping user code (tools, agents) into actors: by value when other processes cannot import it.

Ray pickles functions by reference to their module. A tool defined in a pipeline file run by
`kvmesh run`, a test module or a notebook lives in a module the actors cannot import; those modules
are pickled by value instead. Installed packages and kvmesh itself stay by reference.
"""

from __future__ import annotations

import pickle
import sys
import sysconfig
from pathlib import Path
from typing import Any

from ray import cloudpickle

_INSTALLED = tuple(
    str(Path(p).resolve()) for key in ("stdlib", "platstdlib", "purelib", "platlib") if (p := sysconfig.get_path(key))
)


def _needs_value(module_name: str) -> bool:
    if module_name in ("__main__", "builtins") or module_name.split(".")[0] == "kvmesh":
        return False  # __main__ goes by value anyway; kvmesh is importable everywhere it runs
    module = sys.modules.get(module_name)
    origin = getattr(module, "__file__", None)
    if module is None or origin is None:
        return False
    return not str(Path(origin).resolve()).startswith(_INSTALLED)


def dumps(obj: Any, functions: list[Any]) -> bytes:
    """Pickle obj; the modules defining `functions` are pickled by value where actors may not import them."""
    modules = {m for fn in functions if (m := getattr(fn, "__module__", None)) and _needs_value(m)}
    for name in modules:
        cloudpickle.register_pickle_by_value(sys.modules[name])
    try:
        return cloudpickle.dumps(obj)
    finally:
        for name in modules:
            cloudpickle.unregister_pickle_by_value(sys.modules[name])


def loads(data: bytes) -> Any:
    return pickle.loads(data)
