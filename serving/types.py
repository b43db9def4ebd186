"""What the gateway asks of a serving backend, and what it gets back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

FALLBACK = "base (fallback)"
"""``Generation.served_by`` when the base model answered because the adapter could not be served."""


@dataclass(frozen=True)
class AdapterRef:
    """A tenant's adapter version as the serving tier knows it: an immutable name and its files."""

    serving_name: str
    path: Path


@dataclass(frozen=True)
class GenerationRequest:
    """One OpenAI-style request. ``messages`` (chat) or ``prompt`` (completion), never both."""

    adapter: AdapterRef | None
    messages: Sequence[Mapping[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    fallback_to_base: bool = False
    """The tenant's policy: when ``adapter`` cannot be served (missing or unloadable files, a
    load that times out), answer from the base model with ``served_by`` ``FALLBACK`` instead of
    failing with 503 ``adapter_unavailable``."""


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int


@dataclass(frozen=True)
class Generation:
    choices: list[Choice]
    prompt_tokens: int
    served_by: str = field(default="base")
    """The serving name that computed the answer, or ``base``."""


@dataclass(frozen=True)
class Served:
    """The first item of a stream: who computes the answer (a serving name, ``base`` or
    ``FALLBACK``), known once routing and adapter loading are done and before any text, so the
    gateway can say so in the response headers."""

    served_by: str


class ServingBackend(Protocol):
    """The engine behind the gateway: it computes; the gateway authorizes, routes and meters."""

    async def generate(self, request: GenerationRequest) -> Generation: ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[Served | str | Generation]:
        """A single answer (``n == 1``): first ``Served``, then text pieces as they are
        produced; the last item is the finished ``Generation`` (token counts, finish reason).
        Errors before ``Served`` (an adapter that cannot be served) are the request's errors."""
        ...

    async def load(self, adapter: AdapterRef) -> None:
        """Make ``adapter`` ready to answer before anyone asks for it: a promotion preloads the
        new version, so its first request does not pay the load. Raises ``Unavailable``
        (``adapter_unavailable``) when it cannot be loaded."""
        ...

    async def unload(self, serving_name: str) -> None:
        """Forget a retired adapter (best effort); asking for it again loads it again."""
        ...

    async def close(self) -> None: ...
