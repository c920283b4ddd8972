"""A small Server-Sent Events reader for tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Message:
    id: str | None
    event: str | None
    data: dict[str, Any]


async def read_stream(
    client: httpx.AsyncClient, path: str, *, headers: dict[str, str] | None = None, limit: int = 10_000
) -> tuple[list[Message], list[str]]:
    """Read a stream until the server closes it; return the messages and the comment lines."""
    messages: list[Message] = []
    comments: list[str] = []
    fields: dict[str, str] = {}
    async with client.stream("GET", path, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith(":"):
                comments.append(line[1:].strip())
            elif line == "":
                if "data" in fields:
                    messages.append(Message(fields.get("id"), fields.get("event"), json.loads(fields["data"])))
                    if len(messages) >= limit:
                        break
                fields = {}
            else:
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
    return messages, comments
