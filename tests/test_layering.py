"""The import layering (ARCHITECTURE.md, "Layering"), checked on the source with `ast`.

Every import counts, at a module's top or inside a function (a lazy import is still a dependency), and
relative imports are resolved against the package the file installs as (pyproject's package-dir).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "kvmesh"
ALL_LAYERS = frozenset({"kvmesh", "agents", "kvcomm", "workers", "runtime", "bench"})

# layer -> the project layers its modules may import, and the rule's words for a violation
MAY_IMPORT: dict[str, tuple[frozenset[str], str]] = {
    "agents": (frozenset({"agents"}), "agents/ imports nothing of the project"),
    "kvcomm": (frozenset({"kvcomm"}), "kvcomm/ imports only kvcomm/"),
    "workers": (frozenset({"workers", "kvcomm"}), "workers/ imports only workers/ and kvcomm/"),
    # nor the root: kvmesh/cli.py imports bench
    "runtime": (ALL_LAYERS - {"bench", "kvmesh"}, "runtime/ never imports bench/ or the kvmesh root"),
    "bench": (ALL_LAYERS, ""),
    "kvmesh": (ALL_LAYERS, ""),  # the package root: the public API and the whole command line
}
# The distributed stack stays inside runtime/ (which also holds the generated kvmesh.v1 stubs).
RUNTIME_ONLY = ("ray", "grpc", "grpc_health", "grpc_reflection", "google.protobuf", "opentelemetry")
RUNTIME_ONLY_RULE = "Ray, gRPC, protobuf and OpenTelemetry are imported only in runtime/"

# (file, imported module) -> why this one import may cross its rule. Each must still be needed.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("agents/agent.py", "kvmesh.workers.sampling_limits"): (
        "one torch-free check of the sampling fields for the engine and for an Agent, which refuses when a "
        "pipeline is built what a worker would refuse at run time"
    ),
    ("agents/agent.py", "kvmesh.workers.vocabulary"): (
        "the one torch-free definition of the reuse modes, for the worker and for an Agent, which refuses when a "
        "pipeline is built a mode the worker would refuse"
    ),
    ("bench/runtime_bench.py", "grpc"): "measures a bare gRPC echo as the floor under the runtime's calls",
    ("bench/runtime_bench.py", "ray"): "measures a Ray actor call beside the runtime's gRPC message",
    ("bench/cluster_bench.py", "ray"): "reads the session's worker actors (pids, addresses) and leaves the cluster",
    ("bench/local_cluster.py", "ray"): "waits until the nodes it started have joined",
}


def package_dirs() -> dict[str, str]:
    """folder -> the package it installs as, from pyproject's [tool.setuptools.package-dir]."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    return {folder: package for package, folder in re.findall(r'^"(kvmesh[\w.]*)" = "([\w/]+)"', pyproject, re.M)}


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to; None outside the project."""
    parts = module.split(".")
    if parts[0] != PROJECT:
        return None
    if len(parts) > 1 and parts[1] == "v1":  # the gRPC stubs, generated into runtime/generated
        return "runtime"
    return parts[1] if len(parts) > 1 and parts[1] in ALL_LAYERS else "kvmesh"


def imports(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute dotted name) of everything `source` imports; `from m import n` yields m.n, which is
    n's own module when n is a submodule and lies in m's layer when it is not."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level > len(package):
                    raise ValueError(f"{module}:{node.lineno}: a relative import beyond the top-level package")
                base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            else:
                base = node.module.split(".") if node.module else []
            yield from ((node.lineno, ".".join([*base, alias.name])) for alias in node.names)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def broken_rule(layer: str, target: str) -> str | None:
    """The rule a module of `layer` breaks by importing `target`, or None."""
    target_layer = layer_of(target)
    allowed, rule = MAY_IMPORT[layer]
    if target_layer is not None and target_layer not in allowed:
        return rule
    if layer != "runtime" and any(_within(target, m) for m in RUNTIME_ONLY):
        return RUNTIME_ONLY_RULE
    return None


def check(label: str, source: str, module: str, is_package: bool) -> list[tuple[str, str, str]]:
    """(where, what, rule) for each import of the file that breaks a rule; `label` names the file."""
    layer = layer_of(module)
    assert layer is not None, module
    found = []
    for line, target in imports(source, module, is_package):
        rule = broken_rule(layer, target)
        if rule is not None:
            found.append((f"{label}:{line}", target, rule))
    return found


def project_files() -> Iterator[tuple[str, str, bool]]:
    """(path from the root, module name, is a package) of every .py file the project installs."""
    dirs = package_dirs()
    for folder in sorted(dirs, key=len, reverse=True):  # runtime/generated/kvmesh/v1 before runtime
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            owner = max((f for f in dirs if relative.startswith(f + "/")), key=len)
            if owner != folder:
                continue  # a deeper folder installs it under its own name
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            yield relative, ".".join([dirs[folder], *(parts[:-1] if is_package else parts)]), is_package


def excepted(label: str, target: str) -> tuple[str, str] | None:
    path = label.rsplit(":", 1)[0]
    return next((key for key in EXCEPTIONS if key[0] == path and _within(target, key[1])), None)


def test_the_checker_sees_relative_lazy_and_third_party_imports():
    source = (
        "from . import placement\n"  # agents itself: fine
        "from ..workers import engine\n"
        "def run():\n"
        "    import ray.util\n"
        "    from kvmesh.runtime.cli import add_model_options\n"
    )
    found = check("agents/x.py", source, "kvmesh.agents.x", is_package=False)
    assert found == [
        ("agents/x.py:2", "kvmesh.workers.engine", "agents/ imports nothing of the project"),
        ("agents/x.py:4", "ray.util", RUNTIME_ONLY_RULE),
        ("agents/x.py:5", "kvmesh.runtime.cli.add_model_options", "agents/ imports nothing of the project"),
    ]
    in_package = check("runtime/__init__.py", "from ..bench import cli\n", "kvmesh.runtime", is_package=True)
    assert in_package == [("runtime/__init__.py:1", "kvmesh.bench.cli", MAY_IMPORT["runtime"][1])]
    assert check("workers/x.py", "from ..kvcomm.kv_cache import KVCache\n", "kvmesh.workers.x", False) == []
    assert check("bench/x.py", "from kvmesh import Agent\n", "kvmesh.bench.x", False) == []


def test_the_files_install_as_the_packages_they_are_in():
    modules = {path: module for path, module, _ in project_files()}
    assert modules["runtime/cli.py"] == "kvmesh.runtime.cli"
    assert modules["runtime/generated/kvmesh/v1/worker_pb2.py"] == "kvmesh.v1.worker_pb2"
    assert modules["kvmesh/__init__.py"] == "kvmesh"
    assert {layer_of(m) for m in modules.values()} == ALL_LAYERS


def test_every_import_keeps_to_the_layering():
    violations, used = [], set()
    for path, module, is_package in project_files():
        for where, target, rule in check(path, (ROOT / path).read_text(), module, is_package):
            key = excepted(where, target)
            if key is None:
                violations.append(f"{where} imports {target} ({rule})")
            else:
                used.add(key)
    assert not violations, "\n".join(violations)
    stale = set(EXCEPTIONS) - used
    assert not stale, f"exceptions no import needs any more (remove them): {sorted(stale)}"
