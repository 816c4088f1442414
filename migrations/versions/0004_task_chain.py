"""hash chain of each base's task sequence; an index for accuracy-matrix columns

Adds ``tasks.chain_prev_sha256`` and ``tasks.chain_sha256`` (registry.chain) and the index
``ix_evaluations_after_task_id``. Upgrade links the ready tasks already recorded, base by base
in position order (a gap in positions, left by `task delete`, starts from the task before it as
it stands now). Downgrade drops both columns and the index.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 23:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

from registry import chain

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('chain_prev_sha256', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('chain_sha256', sa.String(length=64), nullable=True))
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.create_index('ix_evaluations_after_task_id', ['after_task_id'], unique=False)

    conn = op.get_bind()
    bases = conn.execute(sa.text("SELECT id, weights_sha256 FROM base_models")).all()
    for base_id, weights_sha256 in bases:
        prev = chain.genesis(weights_sha256)
        tasks = conn.execute(sa.text(
            "SELECT t.id, t.position, t.name, a.sha256, p.sha256 FROM tasks t "
            "JOIN artifacts a ON a.id = t.artifact_id JOIN artifacts p ON p.id = t.probe_artifact_id "
            "WHERE t.base_id = :b AND t.status = 'ready' ORDER BY t.position"
        ), {"b": base_id}).all()
        for task_id, position, name, task_sha256, probe_sha256 in tasks:
            value = chain.link(prev, position, name, task_sha256, probe_sha256)
            conn.execute(
                sa.text("UPDATE tasks SET chain_prev_sha256 = :p, chain_sha256 = :c WHERE id = :i"),
                {"p": prev, "c": value, "i": task_id},
            )
            prev = value


def downgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_index('ix_evaluations_after_task_id')
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_column('chain_sha256')
        batch_op.drop_column('chain_prev_sha256')
