"""The in-process backend: transformers + PEFT with one resident base model.

Adapters load on demand and are evicted least-recently-used past ``max_adapters``. A micro-batcher
answers concurrent requests — different tenants included — with one ``generate`` call whose
``adapter_names`` pick each row's adapter, which PEFT computes row by row with the same outputs
as serving each alone (measured in feasibility-ml.md §5), at 3-5x the throughput of one request
after the other. The model runs in one dedicated thread; the event loop never blocks on it.

An adapter that fails to load (missing or corrupt files, weights that do not fit the base model)
fails only the requests that asked for it, with 503 ``adapter_unavailable`` — or, where the
request's tenant policy allows it, they are answered from the base model and marked
``FALLBACK``; the rest of the batch is answered as usual.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ContextLengthExceeded, Unavailable
from serving.types import FALLBACK, AdapterRef, Choice, Generation, GenerationRequest, Served

log = logging.getLogger(__name__)

PEFT_BASE_ROW = "__base__"  # PEFT's adapter name for "no adapter" inside a mixed batch


@dataclass
class _Job:
    request: GenerationRequest
    done: asyncio.Future[Generation]
    on_text: Callable[[str | Served], None] | None = None  # set for streaming jobs


class LocalBackend:
    def __init__(
        self,
        *,
        base_model: str,
        data_dir: Path,
        max_adapters: int = 16,
        max_batch: int = 32,
        device: str | None = None,
    ) -> None:
        self.base_model = base_model
        self.data_dir = data_dir
        self.max_adapters = max_adapters
        self.max_batch = max_batch
        self.device = device
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-serving")
        self._model: Any = None  # the base model, wrapped in a PeftModel once an adapter loads
        self._tokenizer: Any = None
        self._loaded: OrderedDict[str, Path] = OrderedDict()  # LRU: oldest first
        self._pending: list[_Job] = []
        self._flusher: asyncio.Task[None] | None = None
        self.batches_run = 0
        """How many ``generate`` calls ran: with the request count, the batching achieved."""

    # --- public API -------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> Generation:
        return await self._submit(_Job(request, asyncio.get_running_loop().create_future()))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Served | str | Generation]:
        if request.n != 1:
            raise ValueError("streaming answers one choice at a time (n=1)")
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[Served | str | None] = asyncio.Queue()

        def on_text(text: str | Served) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        job = _Job(request, loop.create_future(), on_text=on_text)
        task = asyncio.ensure_future(self._submit(job))
        task.add_done_callback(lambda _: loop.call_soon(pieces.put_nowait, None))
        while (piece := await pieces.get()) is not None:
            yield piece
        yield await task  # raises what the generation raised

    async def load(self, adapter: AdapterRef) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._preload, adapter)

    async def unload(self, serving_name: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._evict, serving_name)

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def loaded_adapters(self) -> list[str]:
        """Serving names loaded now, least recently used first (operators, tests)."""
        return list(self._loaded)

    # --- batching ---------------------------------------------------------------------------

    async def _submit(self, job: _Job) -> Generation:
        self._pending.append(job)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await job.done

    async def _flush(self) -> None:
        # Requests that arrive while a batch runs form the next one; the task ends when idle.
        loop = asyncio.get_running_loop()
        while self._pending:
            group = self._take_group()
            try:
                results = await loop.run_in_executor(self._executor, self._run, group)
            except Exception as exc:  # the engine failed: every caller in the batch hears why
                for job in group:
                    if not job.done.done():
                        job.done.set_exception(exc)
                continue
            for job, result in zip(group, results, strict=True):
                if job.done.done():
                    continue
                if isinstance(result, Exception):  # this job's adapter failed, not the batch
                    job.done.set_exception(result)
                else:
                    job.done.set_result(result)

    def _take_group(self) -> list[_Job]:
        """The oldest job and those that can share its ``generate`` call (same sampling)."""
        first = self._pending.pop(0)
        if first.on_text is not None or first.request.seed is not None:
            return [first]  # a streamer or a seed needs a call of its own
        key = _sampling_key(first.request)
        group, rows = [first], first.request.n
        adapters = {_adapter_name(first.request)}
        for job in list(self._pending):
            if rows + job.request.n > self.max_batch:
                break
            # All of a batch's adapters must be loaded at once: at most max_adapters of them.
            more = adapters | {_adapter_name(job.request)}
            if (
                job.on_text is None
                and job.request.seed is None
                and _sampling_key(job.request) == key
                and len(more - {None}) <= self.max_adapters
            ):
                self._pending.remove(job)
                group.append(job)
                rows += job.request.n
                adapters = more
        return group

    # --- the model thread -------------------------------------------------------------------

    def _ensure_loaded(self) -> None:
        if self._model is None:
            from trainer.base_models import load_base_model

            self._model, self._tokenizer = load_base_model(
                self.base_model, data_dir=self.data_dir, device=self.device
            )
            self._tokenizer.padding_side = "left"
            log.info("serving base model %s", self.base_model)

    def _preload(self, ref: AdapterRef) -> None:
        self._ensure_loaded()
        failure = self._use({ref}).get(ref.serving_name)
        if failure is not None:
            raise Unavailable(
                f"the adapter {ref.serving_name} cannot be loaded: {str(failure)[:300]}",
                code="adapter_unavailable",
            ) from failure

    def _use(self, adapters: set[AdapterRef]) -> dict[str, Exception]:
        """Load the batch's adapters, evicting the least recently used ones it does not need.
        Returns the adapters that failed to load, with why; the others are ready."""
        failed: dict[str, Exception] = {}
        needed = {a.serving_name for a in adapters}
        for ref in sorted(adapters, key=lambda a: a.serving_name):
            if ref.serving_name in self._loaded:
                self._loaded.move_to_end(ref.serving_name)
                continue
            while len(self._loaded) >= self.max_adapters:
                self._evict(next(n for n in self._loaded if n not in needed))
            try:
                self._load(ref)
            except Exception as exc:  # handed to the requests that use this adapter
                log.warning("cannot load adapter %s: %s", ref.serving_name, str(exc)[:300])
                failed[ref.serving_name] = exc
                if self._model is None:
                    # The failure left the base model unusable and it was dropped (see
                    # _discard): load it again, then the batch's other adapters.
                    self._ensure_loaded()
                    rest = {a for a in adapters if a.serving_name not in failed}
                    return failed | self._use(rest)
        return failed

    def _load(self, ref: AdapterRef) -> None:
        from peft import PeftConfig, PeftModel
        from peft.utils import load_peft_weights

        # Read both files before touching the model: a missing or corrupt adapter (the usual
        # failure) then fails here and leaves the model exactly as it was.
        PeftConfig.from_pretrained(str(ref.path))
        load_peft_weights(str(ref.path), device="cpu")
        try:
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(str(ref.path), adapter_name=ref.serving_name)
            else:
                self._model = PeftModel.from_pretrained(
                    self._model, str(ref.path), adapter_name=ref.serving_name
                )
                self._model.eval()
        except Exception:
            self._discard(ref.serving_name)
            raise
        self._loaded[ref.serving_name] = ref.path
        log.info("loaded adapter %s", ref.serving_name)

    def _discard(self, serving_name: str) -> None:
        """Undo a load that failed after PEFT began injecting the adapter's layers (weights
        that do not fit the base model): its layers would otherwise change every answer."""
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer

        if isinstance(self._model, PeftModel) and serving_name in self._model.peft_config:
            self._model.delete_adapter(serving_name)
        leftovers = any(
            isinstance(m, BaseTunerLayer)
            and any(serving_name in getattr(m, attr, {}) for attr in m.adapter_layer_names)
            for m in self._model.modules()
        )
        if leftovers:
            # E.g. PeftModel.from_pretrained injected into the bare base model, then failed:
            # that model is no longer the base. Start again from the files (seconds, and rare).
            log.warning("dropping the model after a partial load of %s", serving_name)
            self._model, self._tokenizer = None, None
            self._loaded.clear()

    def _evict(self, serving_name: str) -> None:
        if serving_name in self._loaded:
            self._model.delete_adapter(serving_name)
            del self._loaded[serving_name]
            if not self._loaded:
                # A PeftModel without adapters cannot generate (its active adapter still names
                # the deleted one): back to the bare base model, which the next adapter wraps.
                self._model = self._model.unload()
            log.info("unloaded adapter %s", serving_name)

    def _prompt_text(self, request: GenerationRequest) -> str:
        if request.messages is not None:
            text: str = self._tokenizer.apply_chat_template(
                [dict(m) for m in request.messages], tokenize=False, add_generation_prompt=True
            )
            return text
        return request.prompt or ""

    def _run(self, group: list[_Job]) -> list[Generation | Exception]:
        """Each job's answer, or the error of a job whose adapter could not be loaded."""
        self._ensure_loaded()
        failed = self._use({j.request.adapter for j in group if j.request.adapter is not None})
        outcomes: list[Generation | Exception | None] = [None] * len(group)
        served: list[tuple[_Job, str]] = []  # the jobs that get an answer, and from what
        for i, job in enumerate(group):
            ref = job.request.adapter
            if ref is None:
                served.append((job, "base"))
            elif ref.serving_name not in failed:
                served.append((job, ref.serving_name))
            elif job.request.fallback_to_base:
                log.warning("serving %s from the base model (tenant policy)", ref.serving_name)
                served.append((job, FALLBACK))
            else:
                error = Unavailable(
                    f"the adapter {ref.serving_name} cannot be served right now",
                    code="adapter_unavailable",
                )
                error.__cause__ = failed[ref.serving_name]
                outcomes[i] = error
        # A prompt that leaves no room for its answer in the model's context is refused alone,
        # before it joins the batch: it would fail (or turn to garbage) every row beside it.
        context = int(getattr(self._model.config, "max_position_embeddings", 0) or 0)
        if context:
            position = {id(job): i for i, job in enumerate(group)}
            fits = []
            for job, served_by in served:
                too_long = self._context_error(job.request, context)
                if too_long is None:
                    fits.append((job, served_by))
                else:
                    outcomes[position[id(job)]] = too_long
            served = fits
        answers = iter(self._generate(served) if served else [])
        return [o if o is not None else next(answers) for o in outcomes]

    def _context_error(
        self, request: GenerationRequest, context: int
    ) -> ContextLengthExceeded | None:
        prompt = len(
            self._tokenizer(self._prompt_text(request), add_special_tokens=False)["input_ids"]
        )
        needed = prompt + request.max_tokens
        if needed <= context:
            return None
        return ContextLengthExceeded(
            f"this model's context is {context} tokens; the request needs {needed} "
            f"({prompt} in the prompt, {request.max_tokens} for the answer): shorten the messages "
            "or lower max_tokens",
            details={"field": "messages" if request.messages is not None else "prompt"},
        )

    def _generate(self, served: list[tuple[_Job, str]]) -> list[Generation]:
        import torch

        group = [job for job, _ in served]
        tok = self._tokenizer
        texts, adapter_rows = [], []
        for job, served_by in served:
            text = self._prompt_text(job.request)
            name = served_by if served_by not in ("base", FALLBACK) else PEFT_BASE_ROW
            texts += [text] * job.request.n
            adapter_rows += [name] * job.request.n
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        device = next(self._model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        first = group[0].request
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(j.request.max_tokens for j in group),
            "pad_token_id": tok.pad_token_id,
        }
        if first.temperature > 0:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None)
        if self._loaded:
            kwargs["adapter_names"] = adapter_rows
        if first.seed is not None:
            torch.manual_seed(first.seed)
        streamer = None
        if group[0].on_text is not None:
            group[0].on_text(Served(served[0][1]))
            streamer = _Streamer(tok, group[0].on_text, first.stop)
            kwargs["streamer"] = streamer
        with torch.no_grad():
            out = self._model.generate(**enc, **kwargs)
        self.batches_run += 1
        width = enc["input_ids"].shape[1]
        results, row = [], 0
        for job, served_by in served:
            choices = []
            for _ in range(job.request.n):
                ids = out[row, width:].tolist()
                choices.append(_finish(tok, ids, job.request))
                row += 1
            prompt_tokens = int(enc["attention_mask"][row - 1].sum())
            results.append(
                Generation(choices=choices, prompt_tokens=prompt_tokens, served_by=served_by)
            )
        return results


def _adapter_name(r: GenerationRequest) -> str | None:
    return r.adapter.serving_name if r.adapter is not None else None


def _sampling_key(r: GenerationRequest) -> tuple[bool, float, float]:
    greedy = r.temperature <= 0
    return (greedy, 0.0 if greedy else r.temperature, 1.0 if greedy else r.top_p)


def _finish(tok: Any, ids: list[int], request: GenerationRequest) -> Choice:
    """Cut a row at end-of-sequence, its own ``max_tokens`` and its stop strings."""
    eos = tok.eos_token_id
    finish = "length"
    if eos in ids:
        ids = ids[: ids.index(eos)]
        finish = "stop"
    if len(ids) > request.max_tokens:
        ids, finish = ids[: request.max_tokens], "length"
    text = _clean(tok.decode(ids, skip_special_tokens=True))
    for stop in request.stop:
        if stop and stop in text:
            text, finish = text[: text.index(stop)], "stop"
    return Choice(text=text, finish_reason=finish, completion_tokens=len(ids))


def _clean(text: str) -> str:
    # A byte-level model can emit NUL; no client wants it and PostgreSQL cannot store it.
    return text.replace("\x00", "")


class _Streamer:
    """Hands decoded text to the event loop as tokens arrive (transformers' streamer protocol)."""

    def __init__(
        self, tok: Any, on_text: Callable[[str | Served], None], stop: tuple[str, ...]
    ) -> None:
        self.tok, self.on_text, self.stop = tok, on_text, stop
        self.prompt_seen = False
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        if self.stopped:
            return
        new = value.tolist()
        self.ids += new if isinstance(new, list) else [new]
        if self.tok.eos_token_id in self.ids:
            self.ids = self.ids[: self.ids.index(self.tok.eos_token_id)]
            self.stopped = True
        text = _clean(self.tok.decode(self.ids, skip_special_tokens=True))
        for stop in self.stop:
            if stop and stop in text:
                text, self.stopped = text[: text.index(stop)], True
        # Hold back a trailing replacement char: a multi-byte character may be half decoded.
        if not self.stopped and text.endswith("\ufffd"):
            return
        if len(text) > len(self.sent):
            self.on_text(text[len(self.sent) :])
            self.sent = text

    def end(self) -> None:
        pass
