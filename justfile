# Recipes for working on iiq. Each runs inside .venv, which `python3 dev.py` creates on first use.

# Run the demo: embedded Postgres, the server and one L5 Batching experiment, end to end.
demo:
    python3 dev.py demo

# Run the whole test suite (extra arguments go to pytest).
test *ARGS:
    python3 dev.py test {{ARGS}}

# Run the benchmark (about 10 minutes) and write BENCHMARKS.md; `just bench --smoke` only checks that it runs.
bench *ARGS:
    python3 dev.py python -m tests.bench.run {{ARGS}}

# Serve the API and a worker on 127.0.0.1:8000.
serve:
    python3 dev.py iiq serve

# Lint, check formatting and type-check.
lint:
    python3 dev.py ruff check iiq tools tests
    python3 dev.py ruff format --check iiq tools tests
    python3 dev.py mypy

# Apply pending database migrations.
migrate:
    python3 dev.py iiq migrate
