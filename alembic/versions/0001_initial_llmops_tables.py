"""Initial llmops tables: artifacts, versions, lineage, runs, hardware, benchmark results, promotions.

Revision ID: 0001
Revises: 
Create Date: 2026-11-23 09:25:39.715921
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('llmops_artifacts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=256), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=True),
    sa.Column('uri', sa.Text(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('format', sa.String(length=32), nullable=True),
    sa.Column('quant', sa.String(length=32), nullable=True),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=128), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sha256', name='uq_llmops_artifacts_sha256')
    )
    op.create_table('llmops_hardware',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('cpu_model', sa.String(length=256), nullable=True),
    sa.Column('cores', sa.Integer(), nullable=True),
    sa.Column('isa_flags', sa.JSON(), nullable=False),
    sa.Column('ram_bytes', sa.BigInteger(), nullable=True),
    sa.Column('gpu_name', sa.String(length=256), nullable=True),
    sa.Column('gpu_memory_bytes', sa.BigInteger(), nullable=True),
    sa.Column('gpu_driver', sa.String(length=64), nullable=True),
    sa.Column('cuda_version', sa.String(length=32), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('fingerprint')
    )
    op.create_table('llmops_promotions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=256), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('alias', sa.String(length=64), nullable=False),
    sa.Column('previous_version', sa.String(length=64), nullable=True),
    sa.Column('gates', sa.JSON(), nullable=False),
    sa.Column('verdict', sa.String(length=16), nullable=False),
    sa.Column('forced', sa.Boolean(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('actor', sa.String(length=128), nullable=True),
    sa.Column('ci', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('llmops_promotions', schema=None) as batch_op:
        batch_op.create_index('ix_llmops_promotions_model', ['model'], unique=False)

    op.create_table('llmops_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('command', sa.Text(), nullable=False),
    sa.Column('parameters', sa.JSON(), nullable=False),
    sa.Column('tool_versions', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('mlflow_run_id', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('llmops_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_llmops_runs_mlflow_run_id'), ['mlflow_run_id'], unique=False)

    op.create_table('llmops_benchmark_results',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('artifact_id', sa.Integer(), nullable=False),
    sa.Column('hardware_id', sa.Integer(), nullable=True),
    sa.Column('backend', sa.String(length=32), nullable=False),
    sa.Column('device', sa.String(length=16), nullable=False),
    sa.Column('metric', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('unit', sa.String(length=16), nullable=True),
    sa.Column('eval_dataset_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['artifact_id'], ['llmops_artifacts.id'], ),
    sa.ForeignKeyConstraint(['eval_dataset_id'], ['llmops_artifacts.id'], ),
    sa.ForeignKeyConstraint(['hardware_id'], ['llmops_hardware.id'], ),
    sa.ForeignKeyConstraint(['run_id'], ['llmops_runs.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('llmops_benchmark_results', schema=None) as batch_op:
        batch_op.create_index('ix_llmops_bench_artifact_hw', ['artifact_id', 'hardware_id'], unique=False)

    op.create_table('llmops_lineage',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=False),
    sa.Column('child_id', sa.Integer(), nullable=False),
    sa.Column('relation', sa.String(length=32), nullable=False),
    sa.Column('parameters', sa.JSON(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['child_id'], ['llmops_artifacts.id'], ),
    sa.ForeignKeyConstraint(['parent_id'], ['llmops_artifacts.id'], ),
    sa.ForeignKeyConstraint(['run_id'], ['llmops_runs.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('parent_id', 'child_id', 'relation', name='uq_llmops_lineage_edge')
    )
    with op.batch_alter_table('llmops_lineage', schema=None) as batch_op:
        batch_op.create_index('ix_llmops_lineage_child', ['child_id'], unique=False)
        batch_op.create_index('ix_llmops_lineage_parent', ['parent_id'], unique=False)

    op.create_table('llmops_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=256), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('artifact_id', sa.Integer(), nullable=False),
    sa.Column('mlflow_run_id', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['artifact_id'], ['llmops_artifacts.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('kind', 'name', 'version', name='uq_llmops_versions_kind_name_version')
    )
    with op.batch_alter_table('llmops_versions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_llmops_versions_artifact_id'), ['artifact_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('llmops_versions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_llmops_versions_artifact_id'))

    op.drop_table('llmops_versions')
    with op.batch_alter_table('llmops_lineage', schema=None) as batch_op:
        batch_op.drop_index('ix_llmops_lineage_parent')
        batch_op.drop_index('ix_llmops_lineage_child')

    op.drop_table('llmops_lineage')
    with op.batch_alter_table('llmops_benchmark_results', schema=None) as batch_op:
        batch_op.drop_index('ix_llmops_bench_artifact_hw')

    op.drop_table('llmops_benchmark_results')
    with op.batch_alter_table('llmops_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_llmops_runs_mlflow_run_id'))

    op.drop_table('llmops_runs')
    with op.batch_alter_table('llmops_promotions', schema=None) as batch_op:
        batch_op.drop_index('ix_llmops_promotions_model')

    op.drop_table('llmops_promotions')
    op.drop_table('llmops_hardware')
    op.drop_table('llmops_artifacts')
