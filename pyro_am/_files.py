"""Atomic file writes shared by the commands and benchmarks."""

from __future__ import annotations

import json
import os


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as indented JSON to ``path`` through a temporary file and a rename.

    A reader never sees a half-written file, and a failed write leaves no temporary file behind.
    Missing parent folders are created.
    """
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
