"""Several replicas: the change version they poll, the replica in the audit log, and the
pre-Alembic `schema_version` table dropped (Alembic's own table replaces it).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    changes = op.create_table(
        "changes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(changes, [{"id": 1, "version": 1}])
    op.add_column("audit_log", sa.Column("replica", sa.String(128), nullable=True))
    if "schema_version" in sa.inspect(op.get_bind()).get_table_names():
        op.drop_table("schema_version")


def downgrade() -> None:
    op.drop_column("audit_log", "replica")
    op.drop_table("changes")
