"""Job queue: procrastinate over asyncpg, its schema, and the LISTEN connection it needs."""
