"""The HTTP API: Litestar app, authentication, one module per resource, and the event stream."""
