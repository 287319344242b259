"""Ember's database: the schema, its Alembic migrations and the stores over it."""
