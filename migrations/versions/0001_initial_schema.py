"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-22 07:43:44.659283
"""

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('artifacts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('path', sa.String(length=255), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('num_params', sa.BigInteger(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('base', 'task', 'probe', 'shared')", name=op.f('ck_artifacts_kind')),
    sa.CheckConstraint('bytes >= 0', name=op.f('ck_artifacts_bytes_nonneg')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_artifacts')),
    sa.UniqueConstraint('sha256', name=op.f('uq_artifacts_sha256'))
    )
    op.create_table('base_models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('model_spec', sa.String(length=255), nullable=False),
    sa.Column('architecture', sa.String(length=128), nullable=False),
    sa.Column('weights_artifact_id', sa.Integer(), nullable=False),
    sa.Column('weights_sha256', sa.String(length=64), nullable=False),
    sa.Column('num_params', sa.BigInteger(), nullable=False),
    sa.Column('total_params', sa.BigInteger(), nullable=False),
    sa.Column('data_config', sa.JSON(), nullable=False),
    sa.Column('head_keys', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['weights_artifact_id'], ['artifacts.id'], name=op.f('fk_base_models_weights_artifact_id_artifacts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_base_models')),
    sa.UniqueConstraint('name', name=op.f('uq_base_models_name'))
    )
    op.create_table('tasks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('base_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('method', sa.String(length=32), nullable=False),
    sa.Column('method_config', sa.JSON(), nullable=False),
    sa.Column('train_config', sa.JSON(), nullable=False),
    sa.Column('dataset_spec', sa.JSON(), nullable=False),
    sa.Column('num_classes', sa.Integer(), nullable=False),
    sa.Column('class_names', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('artifact_id', sa.Integer(), nullable=True),
    sa.Column('probe_artifact_id', sa.Integer(), nullable=True),
    sa.Column('head_params', sa.BigInteger(), nullable=True),
    sa.Column('train_seconds', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('training', 'ready', 'failed')", name=op.f('ck_tasks_status')),
    sa.CheckConstraint('position >= 1', name=op.f('ck_tasks_position_positive')),
    sa.ForeignKeyConstraint(['artifact_id'], ['artifacts.id'], name=op.f('fk_tasks_artifact_id_artifacts')),
    sa.ForeignKeyConstraint(['base_id'], ['base_models.id'], name=op.f('fk_tasks_base_id_base_models')),
    sa.ForeignKeyConstraint(['probe_artifact_id'], ['artifacts.id'], name=op.f('fk_tasks_probe_artifact_id_artifacts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tasks')),
    sa.UniqueConstraint('base_id', 'position', name='uq_tasks_base_id_position'),
    sa.UniqueConstraint('name', name=op.f('uq_tasks_name'))
    )
    op.create_table('evaluations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('after_task_id', sa.Integer(), nullable=False),
    sa.Column('split', sa.String(length=16), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('accuracy', sa.Float(), nullable=True),
    sa.Column('loss', sa.Float(), nullable=True),
    sa.Column('num_samples', sa.Integer(), nullable=True),
    sa.Column('max_logit_drift', sa.Float(), nullable=True),
    sa.Column('probe_ok', sa.Boolean(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['after_task_id'], ['tasks.id'], name=op.f('fk_evaluations_after_task_id_tasks'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_evaluations_task_id_tasks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_evaluations'))
    )
    op.create_table('task_dependencies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('depends_on_task_id', sa.Integer(), nullable=True),
    sa.Column('artifact_id', sa.Integer(), nullable=True),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.CheckConstraint('depends_on_task_id IS NOT NULL OR artifact_id IS NOT NULL', name=op.f('ck_task_dependencies_has_target')),
    sa.ForeignKeyConstraint(['artifact_id'], ['artifacts.id'], name=op.f('fk_task_dependencies_artifact_id_artifacts')),
    sa.ForeignKeyConstraint(['depends_on_task_id'], ['tasks.id'], name=op.f('fk_task_dependencies_depends_on_task_id_tasks')),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_task_dependencies_task_id_tasks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_task_dependencies'))
    )
    op.create_table('task_layers',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('layer_name', sa.String(length=255), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('base_params', sa.BigInteger(), nullable=False),
    sa.Column('task_params', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_task_layers_task_id_tasks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_task_layers')),
    sa.UniqueConstraint('task_id', 'layer_name', name='uq_task_layers_task_id_layer_name')
    )


def downgrade() -> None:
    op.drop_table('task_layers')
    op.drop_table('task_dependencies')
    op.drop_table('evaluations')
    op.drop_table('tasks')
    op.drop_table('base_models')
    op.drop_table('artifacts')
