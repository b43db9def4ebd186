"""The ``tuneloop`` command line: the operator's tasks."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db import create_engine, create_sessionmaker
from core.errors import DomainError
from core.settings import ApiSettings, Settings
from trainer import cli as trainer_cli

app = typer.Typer(
    help="tuneloop: per-tenant LLM personalization. Configure with environment variables "
    "(DATABASE_URL, TUNELOOP_DATA_DIR, ...; see the README).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema (Alembic).", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
billing_app = typer.Typer(help="Stripe usage billing (STRIPE_API_KEY).", no_args_is_help=True)
app.add_typer(billing_app, name="billing")
runs_app = typer.Typer(
    help="Personalization runs: answer one waiting for approval (TEMPORAL_ADDRESS).",
    no_args_is_help=True,
)
app.add_typer(runs_app, name="runs")
# The trainer's own commands: `tuneloop train ...` and `tuneloop eval ...` (no database needed).
app.command("train")(trainer_cli.train)
app.command("eval")(trainer_cli.eval)

T = TypeVar("T")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def _settings(cls: type[Settings] = Settings, **overrides: Any) -> Any:
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise _fail(f"bad configuration: {first['loc'][0]}: {first['msg']}") from None


def _run(make: Callable[[AsyncEngine], Awaitable[T]], settings: Settings | None = None) -> T:
    """Run one async task with an engine on a migrated schema; domain errors become a line."""
    from tuneloop.runtime import SchemaBehind, ensure_schema

    settings = settings or _settings()

    async def main() -> T:
        engine = create_engine(settings)
        try:
            await ensure_schema(engine, settings)
            return await make(engine)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except (DomainError, SchemaBehind) as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot reach the database: {exc}") from None


def _print(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Migrate the database (DATABASE_URL, or SQLite in the data dir) to the latest schema."""
    import migrations

    settings = _settings()

    async def main() -> str | None:
        engine = create_engine(settings)
        try:
            await migrations.upgrade(engine, revision)
            return await migrations.current_revision(engine)
        finally:
            await engine.dispose()

    try:
        current = asyncio.run(main())
    except OSError as exc:
        raise _fail(f"cannot reach the database: {exc}") from None
    typer.echo(f"database at revision {current}")


@tenants_app.command("create")
def tenants_create(
    slug: Annotated[str, typer.Argument(help="lower-case letters, digits and hyphens")],
    name: Annotated[str | None, typer.Option(help="display name (default: the slug)")] = None,
) -> None:
    """Create a tenant; prints it with its first admin and product keys (shown once) as JSON."""
    from core.models import Tenant
    from core.stripe_billing import StripeBilling
    from core.tenants import create_tenant

    settings: Settings = _settings(Settings)

    async def make(engine: AsyncEngine) -> dict[str, Any]:
        async with create_sessionmaker(engine)() as session:
            new = await create_tenant(session, slug=slug, name=name)
        billing: dict[str, Any] = {}
        stripe_billing = StripeBilling.from_settings(settings)
        if stripe_billing is not None:  # a Stripe failure leaves it to `tuneloop billing setup`
            try:
                async with create_sessionmaker(engine)() as session:
                    await stripe_billing.provision_quietly(session, tenant_id=new.tenant.id)
                    tenant = await session.get(Tenant, new.tenant.id)
                billing = {"stripe_customer_id": tenant.stripe_customer_id if tenant else None}
            finally:
                await stripe_billing.close()
        return {
            "tenant": {
                "id": new.tenant.id,
                "slug": new.tenant.slug,
                "name": new.tenant.name,
                **billing,
            },
            "admin_key": {"id": new.admin_key.row.id, "key": new.admin_key.secret},
            "product_key": {"id": new.product_key.row.id, "key": new.product_key.secret},
        }

    _print(_run(make, settings))


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str | None, typer.Option(help="tenant slug")] = None,
    role: Annotated[str | None, typer.Option(help="admin or product")] = None,
    platform: Annotated[bool, typer.Option("--platform", help="an operator key")] = False,
    name: Annotated[str, typer.Option(help="a label for the key")] = "",
) -> None:
    """Create one key and print it as JSON.

    ``--tenant SLUG --role admin|product`` for a tenant key, ``--platform`` for an operator key.
    """
    from core.keys import create_key
    from core.models import KeyRole
    from core.tenants import get_tenant_by_slug

    if platform == (tenant is not None):
        raise _fail("give either --platform, or --tenant SLUG with --role admin|product")
    if tenant is not None and role not in ("admin", "product"):
        raise _fail("--role must be admin or product")

    async def make(engine: AsyncEngine) -> dict[str, Any]:
        async with create_sessionmaker(engine)() as session:
            tenant_id = None
            if tenant is not None:
                tenant_id = (await get_tenant_by_slug(session, slug=tenant)).id
            key_role = KeyRole.platform if platform else KeyRole(str(role))
            issued = await create_key(session, tenant_id=tenant_id, role=key_role, name=name)
            await session.commit()
        return {"id": issued.row.id, "role": key_role.value, "tenant": tenant, "key": issued.secret}

    _print(_run(make))


@billing_app.command("setup")
def billing_setup() -> None:
    """Create or find the Stripe Billing Meters, product and metered prices (prices from
    TUNELOOP_PRICE_*_PER_1K_TOKENS), then a customer and subscription for every tenant without
    one. Prints the ids as JSON; safe to run again."""
    import stripe

    from core.stripe_billing import StripeBilling

    settings: Settings = _settings(Settings)
    if not settings.stripe_configured:
        raise _fail("STRIPE_API_KEY is not set: billing runs on the ledger alone without it")

    async def make(engine: AsyncEngine) -> dict[str, Any]:
        billing = StripeBilling.from_settings(settings)
        assert billing is not None
        try:
            catalog = await billing.catalog()
            async with create_sessionmaker(engine)() as session:
                failed = await billing.provision_missing(session)
        finally:
            await billing.close()
        return {"meters": catalog.meters, "prices": catalog.prices, "tenants_failed": failed}

    try:
        _print(_run(make, settings))
    except stripe.StripeError as exc:
        raise _fail(f"Stripe refused: {exc.user_message or exc}") from None


def _decide(run_id: str, *, approve: bool, reason: str | None = None) -> None:
    """Answer a run waiting for approval as the operator; prints the run and the answer."""
    import getpass

    from api.orchestration import Orchestrator
    from core.errors import NotFound
    from core.models import TrainingRun

    settings: Settings = _settings(Settings)
    try:
        by = f"operator {getpass.getuser()} (cli)"
    except (OSError, KeyError):  # no login name in this environment
        by = "operator (cli)"

    async def make(engine: AsyncEngine) -> dict[str, Any]:
        orchestrator = Orchestrator(settings.temporal_address, base_model=settings.base_model)
        async with create_sessionmaker(engine)() as session:
            run = await session.get(TrainingRun, run_id)
            if run is None:
                raise NotFound(f"no run {run_id!r}")
            await orchestrator.decide(session, run=run, approve=approve, by=by, reason=reason)
            return {
                "id": run.id,
                "tenant_id": run.tenant_id,
                "status": run.status.value,
                "adapter_version_id": run.adapter_version_id,
                "decision": "approved" if approve else "rejected",
                "decided_by": by,
            }

    _print(_run(make, settings))


@runs_app.command("approve")
def runs_approve(
    run_id: Annotated[str, typer.Argument(help="the run's id (run_...)")],
) -> None:
    """Let a run waiting for approval promote its candidate."""
    _decide(run_id, approve=True)


@runs_app.command("reject")
def runs_reject(
    run_id: Annotated[str, typer.Argument(help="the run's id (run_...)")],
    reason: Annotated[str | None, typer.Option(help="why; kept with the rejected version")] = None,
) -> None:
    """Turn down the candidate of a run waiting for approval (kept as a rejected version)."""
    _decide(run_id, approve=False, reason=reason)


@app.command("api")
def api(
    host: Annotated[str | None, typer.Option(help="bind address [TUNELOOP_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="port [TUNELOOP_PORT]")] = None,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes")] = 1,
) -> None:
    """Serve the HTTP API with uvicorn (stateless: run as many as you like)."""
    import uvicorn

    settings: ApiSettings = _settings(ApiSettings, host=host, port=port)

    async def nothing(_: AsyncEngine) -> None:
        return None

    _run(nothing, settings)  # migrate the embedded database / check a configured one
    # Worker processes rebuild settings from the environment: pass the overrides on.
    os.environ["TUNELOOP_HOST"], os.environ["TUNELOOP_PORT"] = settings.host, str(settings.port)
    uvicorn.run(
        "tuneloop.asgi:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        log_level="info",
    )


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


@app.command("worker")
def worker(
    queue: Annotated[str, typer.Option(help="cpu, gpu or all")] = "all",
) -> None:
    """Run a Temporal worker (TEMPORAL_ADDRESS) until SIGTERM/SIGINT, then stop gracefully."""
    from workflows.worker import QUEUES, run_worker

    if queue not in QUEUES:
        raise _fail(f"--queue must be one of {', '.join(QUEUES)}, got {queue!r}")
    settings: Settings = _settings(Settings)

    async def main(engine: AsyncEngine) -> None:
        await run_worker(settings, queue=queue, stop=_stop_on_signals())

    try:
        _run(main, settings)
    except RuntimeError as exc:
        raise _fail(str(exc)) from None


@app.command("up")
def up(
    host: Annotated[str | None, typer.Option(help="API bind address [TUNELOOP_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="API port [TUNELOOP_PORT]")] = None,
    temporal_port: Annotated[
        int, typer.Option(help="dev server port (no TEMPORAL_ADDRESS)")
    ] = 7233,
) -> None:
    """Everything on this machine: Temporal dev server, API, a worker on both queues and the
    local serving backend (SQLite in the data dir unless DATABASE_URL is set). Ctrl-C stops."""
    from tuneloop.stack import embedded_stack

    settings: ApiSettings = _settings(ApiSettings, host=host, port=port)

    async def main() -> None:
        async with embedded_stack(settings, temporal_port=temporal_port) as stack:
            typer.echo(f"API        {stack.api_url}  (OpenAPI: {stack.api_url}/docs)")
            typer.echo(f"Dashboard  {stack.api_url}/dashboard  (log in with an admin key)")
            typer.echo(
                f"Temporal   {stack.temporal_address}"
                + (f"  (UI: {stack.temporal_ui})" if stack.temporal_ui else "")
            )
            typer.echo("create a tenant: tuneloop tenants create SLUG   |   Ctrl-C stops")
            await _stop_on_signals().wait()

    try:
        asyncio.run(main())
    except (DomainError, RuntimeError, OSError) as exc:
        raise _fail(str(exc)) from None


@app.command("demo")
def demo() -> None:
    """Bring tuneloop up on the embedded defaults and run the main job end to end."""
    from tuneloop.demo import run_demo

    settings: ApiSettings = _settings(ApiSettings)
    try:
        run_demo(settings)
    except (DomainError, RuntimeError) as exc:
        raise _fail(str(exc)) from None


def main() -> None:  # pragma: no cover - console entry
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    app()
