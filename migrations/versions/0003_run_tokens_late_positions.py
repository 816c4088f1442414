"""run tokens, heartbeats, positions given when a task becomes ready

A task now gets its position when it finishes (status ``ready``), so ``tasks.position`` is
NULL while it trains; the run that owns a row is recorded (token, host, pid, heartbeat).

The status ``failed`` goes: nothing ever set it (a failed run removes its row). Upgrade: rows
that are not ready lose their position (they get one if they ever finish); a ``failed`` row, if
any was written by hand, becomes ``training`` so `task remove` can discard it.
Downgrade: rows without a position get the next free positions of their base, in the order they
were begun (by id), so no row is lost; the run columns are dropped.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 09:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("UPDATE tasks SET status = 'training' WHERE status = 'failed'")
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('ck_tasks_status'), type_='check')
        batch_op.create_check_constraint('status', "status IN ('training', 'ready')")
        batch_op.alter_column('position', existing_type=sa.Integer(), nullable=True)
        batch_op.add_column(sa.Column('run_token', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('run_host', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('run_pid', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_unique_constraint(batch_op.f('uq_tasks_run_token'), ['run_token'])

    op.execute("UPDATE tasks SET position = NULL WHERE status <> 'ready'")


def downgrade() -> None:
    conn = op.get_bind()
    unplaced = conn.execute(
        sa.text("SELECT id, base_id FROM tasks WHERE position IS NULL ORDER BY id")
    ).all()
    next_position: dict[int, int] = {}
    for task_id, base_id in unplaced:
        if base_id not in next_position:
            top = conn.execute(
                sa.text("SELECT MAX(position) FROM tasks WHERE base_id = :b"), {"b": base_id}
            ).scalar()
            next_position[base_id] = (top or 0) + 1
        conn.execute(
            sa.text("UPDATE tasks SET position = :p WHERE id = :i"),
            {"p": next_position[base_id], "i": task_id},
        )
        next_position[base_id] += 1

    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('ck_tasks_status'), type_='check')
        batch_op.create_check_constraint('status', "status IN ('training', 'ready', 'failed')")
        batch_op.drop_constraint(batch_op.f('uq_tasks_run_token'), type_='unique')
        batch_op.drop_column('heartbeat_at')
        batch_op.drop_column('run_pid')
        batch_op.drop_column('run_host')
        batch_op.drop_column('run_token')
        batch_op.alter_column('position', existing_type=sa.Integer(), nullable=False)
