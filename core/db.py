"""Async engine and sessions for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from core.settings import Settings


def create_engine(settings: Settings, **kwargs: Any) -> AsyncEngine:
    url = settings.sqlalchemy_url
    if url.startswith("sqlite"):
        if settings.is_embedded_sqlite:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        # aiosqlite serializes on one thread per connection; timeout is the busy wait for a lock.
        engine = create_async_engine(url, connect_args={"timeout": 30}, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    connect_args = {"server_settings": {"timezone": "UTC", "application_name": "tuneloop"}}
    # A pool big enough for the API's concurrency: overflow connections are closed on return,
    # and reconnecting under load (TLS negotiation included) costs more than waiting.
    kwargs.setdefault("pool_size", 20)
    kwargs.setdefault("max_overflow", 5)
    # No pre-ping: it costs a round trip per checkout; a dropped connection surfaces as a 503
    # (the client retries) and the pool replaces it.
    kwargs.setdefault("pool_recycle", 1800)
    return create_async_engine(url, connect_args=connect_args, **kwargs)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers run beside the writer; foreign keys are off by default in SQLite.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def upsert_insert(session: AsyncSession) -> Any:
    """The session's dialect's ``insert``, the one with ``on_conflict_do_nothing`` (PostgreSQL
    and SQLite spell it alike, but each dialect has its own construct)."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
