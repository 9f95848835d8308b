"""The connections a small local server answers (status socket, metrics).

At most ``limit`` at once, one more is hung up on; each is tracked by the task
serving it, and closing drops them all at once: a server's end never waits for
a client to read what is left.
"""

from __future__ import annotations

import asyncio


class Clients:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._serving: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    def __len__(self) -> int:
        return len(self._serving)

    def admit(self, writer: asyncio.StreamWriter) -> bool:
        """Serve this connection from the current task, or hang up if ``limit`` are served."""
        if len(self._serving) >= self.limit:
            writer.transport.abort()
            return False
        task = asyncio.current_task()
        assert task is not None
        self._serving[task] = writer  # type: ignore[assignment]
        return True

    def done(self) -> None:
        """The current task is done with its connection."""
        self._serving.pop(asyncio.current_task(), None)  # type: ignore[arg-type]

    async def close(self) -> None:
        """Drop every connection and wait for the tasks serving them to end."""
        serving = list(self._serving.items())
        for task, writer in serving:
            writer.transport.abort()
            task.cancel()
        if serving:
            await asyncio.gather(*(task for task, _ in serving), return_exceptions=True)
