"""Postgres access: the embedded server, pools, migrations, named queries and transactions."""
