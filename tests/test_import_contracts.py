"""The one-way imports of ARCHITECTURE.md, checked by import-linter (contracts in pyproject)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run(
        [str(lint)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 0, r.stdout[-3000:]
    assert "broken" in r.stdout and "0 broken" in r.stdout
