"""Where every `kvmesh bench` writes its results: the JSON file named by --json, if any."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def save_json(path: str | None, results: dict[str, Any], log: Callable[[str], None]) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2))
        log(f"wrote {path}")
