"""Test-only tools and helpers."""
