"""The artifact store: tenant-scoped directories under one root (the data dir by default).

Keys are relative paths built here from ids tuneloop generated, never from client input, so no
request can name a path. Writes go to a temporary sibling and are renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def adapter_key(self, tenant_id: str, serving_name: str) -> str:
        return f"tenants/{tenant_id}/adapters/{serving_name}"

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"artifact key {key!r} leaves the store")
        return path

    def put_adapter(self, tenant_id: str, serving_name: str, source: Path) -> str:
        """Copy the PEFT files of ``source`` into the store (idempotent); return the key."""
        key = self.adapter_key(tenant_id, serving_name)
        target = self.path(key)
        if all((target / f).is_file() for f in ADAPTER_FILES):
            return key
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{serving_name}-"))
        try:
            for name in ADAPTER_FILES:
                shutil.copyfile(source / name, tmp / name)
            try:
                os.replace(tmp, target)
            except OSError:
                # Another writer renamed the same content into place first: that copy stands.
                if not all((target / f).is_file() for f in ADAPTER_FILES):
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return key
