"""Benchmark results carry their measurement protocol (JSON) and its key (sha256, indexed).

Rows recorded before have no known protocol: they get ``{"kind": "unknown"}`` and its key,
so they are never compared with results of a known protocol.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 10:12:00.000000
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# Fixed here, as a migration must not change when the code does: the canonical JSON of
# {"kind": "unknown"} (sorted keys, no spaces) and its sha256 (llmops.registry.protocols).
UNKNOWN = {"kind": "unknown"}
UNKNOWN_KEY = "90549387b4013c8f7a3778a5d9a6ebae25182011700baadcb1983f728713ccea"


def upgrade() -> None:
    with op.batch_alter_table('llmops_benchmark_results', schema=None) as batch_op:
        batch_op.add_column(sa.Column('protocol', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('protocol_key', sa.String(length=64), nullable=True))

    results = sa.table('llmops_benchmark_results', sa.column('protocol', sa.JSON()),
                       sa.column('protocol_key', sa.String(length=64)))
    op.execute(results.update().values(protocol=UNKNOWN, protocol_key=UNKNOWN_KEY))

    with op.batch_alter_table('llmops_benchmark_results', schema=None) as batch_op:
        batch_op.alter_column('protocol', existing_type=sa.JSON(), nullable=False)
        batch_op.alter_column('protocol_key', existing_type=sa.String(length=64), nullable=False)
        batch_op.create_index('ix_llmops_bench_protocol_key', ['protocol_key'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('llmops_benchmark_results', schema=None) as batch_op:
        batch_op.drop_index('ix_llmops_bench_protocol_key')
        batch_op.drop_column('protocol_key')
        batch_op.drop_column('protocol')
