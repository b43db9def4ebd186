"""A minimal HTTP/1.1 keep-alive client on asyncio streams, for load generation on loopback.

The load generator shares the two cores with the server under test, so it must cost as little
CPU per request as possible; a full-featured client (httpx) costs several times more.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any


class Client:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _conn(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._writer is None or self._reader is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self._reader, self._writer

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        reader, writer = await self._conn()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        writer.write(head.encode() + b"\r\n" + body)
        status_line = await reader.readline()
        if not status_line:
            await self.close()
            raise ConnectionResetError("server closed the connection")
        status = int(status_line.split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        payload = await reader.readexactly(length) if length else b""
        return status, payload

    async def post_json(self, path: str, obj: Any, key: str) -> int:
        status, _ = await self.request(
            "POST",
            path,
            json.dumps(obj).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        return status

    async def get(self, path: str) -> int:
        return (await self.request("GET", path))[0]

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._reader = self._writer = None
