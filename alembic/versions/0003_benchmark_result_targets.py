"""Benchmark results name the fleet target and node that measured them, and the job they came
from: a job's results are recorded once (unique per job and metric), whatever retries happen.
A promotion names the target whose results its gates read.

Results measured on the machine running llmops (``llmops bench`` without ``--on``) have no
target, node or job key.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 16:00:00.000000
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('llmops_benchmark_results', schema=None) as batch_op:
        batch_op.add_column(sa.Column('target', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('node', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('job_key', sa.String(length=64), nullable=True))
        batch_op.create_index('ix_llmops_bench_target', ['target'], unique=False)
        batch_op.create_index('ux_llmops_bench_job_metric', ['job_key', 'metric'], unique=True)
    with op.batch_alter_table('llmops_promotions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('target', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('llmops_promotions', schema=None) as batch_op:
        batch_op.drop_column('target')
    with op.batch_alter_table('llmops_benchmark_results', schema=None) as batch_op:
        batch_op.drop_index('ux_llmops_bench_job_metric')
        batch_op.drop_index('ix_llmops_bench_target')
        batch_op.drop_column('job_key')
        batch_op.drop_column('node')
        batch_op.drop_column('target')
