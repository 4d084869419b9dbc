"""The Alembic environment of every service: runs on the connection
mlmesh_chassis.database hands it,
recording the schema version in the service's own version table (services
may share one database)."""

from alembic import context

attributes = context.config.attributes
context.configure(
    connection=attributes["connection"],
    target_metadata=None,
    version_table=attributes.get("version_table", "alembic_version"),
)
with context.begin_transaction():
    context.run_migrations()
