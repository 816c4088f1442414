"""task signatures: the artifact kind ``signature`` and ``tasks.signature_artifact_id``

A task's gradient signature (taps_cl.analysis.similarity) is stored as its own small artifact when the task
is added, so similarity queries never need the task's data again. Tasks recorded before this
revision keep NULL (no signature; their chain links are unchanged, since the signature term of a
link exists only for tasks that have one). Downgrade drops the column and the signature rows
(their files become garbage for `taps-cl gc`) and re-links each base's chain without signature
terms, as revision 0004 linked it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 02:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

from registry import chain

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

OLD_KINDS = "kind IN ('base', 'task', 'probe', 'shared')"
NEW_KINDS = "kind IN ('base', 'task', 'probe', 'shared', 'signature')"


def upgrade() -> None:
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('ck_artifacts_kind'), type_='check')
        batch_op.create_check_constraint('kind', NEW_KINDS)
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('signature_artifact_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f('fk_tasks_signature_artifact_id_artifacts'), 'artifacts',
            ['signature_artifact_id'], ['id'],
        )


def downgrade() -> None:
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
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_tasks_signature_artifact_id_artifacts'),
                                 type_='foreignkey')
        batch_op.drop_column('signature_artifact_id')
    conn.execute(sa.text("DELETE FROM artifacts WHERE kind = 'signature'"))
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('ck_artifacts_kind'), type_='check')
        batch_op.create_check_constraint('kind', OLD_KINDS)
