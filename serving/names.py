"""Serving names: immutable, derived from tenant + weights hash, and the only adapter names the
gateway ever sends to an engine (vLLM's resolver follows ``../`` in names it is given)."""

from __future__ import annotations

import re

SERVING_NAME_RE = re.compile(r"^t-[0-9a-z]{26}-[0-9a-f]{12}$")


def serving_name(tenant_id: str, sha256: str) -> str:
    """``t-<tenant>-<first 12 hex of the weights' sha256>``: new weights, new name."""
    name = f"t-{tenant_id.removeprefix('ten_')}-{sha256[:12].lower()}"
    if not SERVING_NAME_RE.fullmatch(name):
        raise ValueError(f"cannot derive a serving name from {tenant_id!r} and {sha256!r}")
    return name


def is_serving_name(name: str) -> bool:
    return SERVING_NAME_RE.fullmatch(name) is not None
