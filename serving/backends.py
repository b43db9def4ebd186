"""The serving backend a process's settings name: in process (``local``) or a vLLM pool."""

from __future__ import annotations

from core.settings import Settings
from serving.local import LocalBackend
from serving.types import ServingBackend
from serving.vllm import VllmPoolBackend


def build_backend(settings: Settings) -> ServingBackend:
    if settings.serving_backend == "local":
        return LocalBackend(base_model=settings.base_model, data_dir=settings.data_dir)
    if not settings.vllm_urls:
        raise RuntimeError(
            "TUNELOOP_SERVING_BACKEND=vllm needs TUNELOOP_VLLM_URLS: the comma-separated base "
            "URLs of the vLLM replicas, e.g. http://10.0.0.5:8000,http://10.0.0.6:8000"
        )
    return VllmPoolBackend(settings.vllm_urls)
