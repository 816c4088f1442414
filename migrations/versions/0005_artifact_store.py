"""the artifact store a registry belongs to

Adds the one-row table ``artifact_store`` (store id and URL; registry.binding). A registry
upgraded from 0004 has no row: it records its store when it is next opened for writing.
Downgrade drops the table; a store's marker object stays, and the registry adopts it again
after the next upgrade (it holds the registry's base weights).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 01:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'artifact_store',
        sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('store_id', sa.String(length=32), nullable=True),
        sa.Column('url', sa.String(length=2048), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint('id = 1', name=op.f('ck_artifact_store_single_row')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_artifact_store')),
    )


def downgrade() -> None:
    op.drop_table('artifact_store')
