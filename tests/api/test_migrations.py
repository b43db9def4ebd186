"""The schema comes from Alembic alone, and the models agree with it on both backends."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

import migrations
from core.models import Base
from tests.conftest import Backend


async def test_models_match_migrations(backend: Backend) -> None:
    async with backend.engine.connect() as conn:
        diff = await conn.run_sync(
            lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata)
        )
    assert diff == [], f"models and migrations differ; write a migration: {diff}"
    assert await migrations.current_revision(backend.engine) == migrations.head_revision()


async def test_upgrade_is_idempotent(backend: Backend) -> None:
    await migrations.upgrade(backend.engine)
    assert await migrations.current_revision(backend.engine) == migrations.head_revision()
