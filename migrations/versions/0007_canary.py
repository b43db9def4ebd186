"""canary: when the live canary began, and which arm answered each interaction

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("canary_started_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("interactions") as batch:
        batch.add_column(sa.Column("canary_arm", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("interactions") as batch:
        batch.drop_column("canary_arm")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("canary_started_at")
