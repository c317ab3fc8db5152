"""Alembic migrations of the chromobatch schema (packaged as chromobatch.migrations)."""
