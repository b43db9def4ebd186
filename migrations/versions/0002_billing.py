"""billing: Stripe subscription and billing status on tenants

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("stripe_subscription_id", sa.String(length=255), nullable=True))
        batch.add_column(
            sa.Column(
                "billing_status",
                sa.Enum(
                    "active",
                    "suspended",
                    name="billing_status",
                    native_enum=False,
                    create_constraint=True,
                    length=32,
                ),
                nullable=False,
                # Existing tenants are paid up until Stripe says otherwise.
                server_default="active",
            )
        )
        batch.add_column(sa.Column("billing_reason", sa.Text(), nullable=True))
    # The model sets the value itself; the default was only for the rows already there.
    with op.batch_alter_table("tenants") as batch:
        batch.alter_column("billing_status", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("billing_reason")
        batch.drop_column("billing_status")
        batch.drop_column("stripe_subscription_id")
