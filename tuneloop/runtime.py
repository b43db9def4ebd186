"""Start-up helpers shared by the CLI commands: settings, engine and a schema at head."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

import migrations
from core.settings import Settings


class SchemaBehind(RuntimeError):
    pass


async def ensure_schema(engine: AsyncEngine, settings: Settings) -> None:
    """The embedded SQLite database is migrated on the spot; a configured database must already
    be at head (migrating a shared production database is the operator's explicit step)."""
    if settings.is_embedded_sqlite:
        await migrations.upgrade(engine)
        return
    current, head = await migrations.current_revision(engine), migrations.head_revision()
    if current != head:
        raise SchemaBehind(
            f"the database schema is at revision {current or '(empty)'}, this tuneloop needs "
            f"{head}: run `tuneloop db upgrade` first"
        )
