"""The network meter's account on disk: one JSON file in the state directory.

What stays true: a write replaces the whole file atomically (temporary file,
fsync, rename), so after a crash the file holds either the previous account or
the new one, never a mix; a missing file is an empty account.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qudata_agent.errors import AgentError


class MeterFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise AgentError(f"network meter file {self.path} unreadable: {e}") from e
        return data if isinstance(data, dict) else {}

    def save(self, data: dict[str, Any]) -> None:
        temp = self.path.with_name(self.path.name + ".tmp")
        with open(temp, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"), sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, self.path)
