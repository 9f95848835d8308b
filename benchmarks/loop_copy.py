"""The naive receiver on an event loop: what the loop itself costs, nothing parsed.

    python benchmarks/loop_copy.py --connections N [--loop uvloop|asyncio]

Like ``plain_copy.py`` (the same JSON lines, so the same harness runs it) but
on one event loop thread: each connection a ``BufferedProtocol`` whose
``get_buffer`` returns one reused 1 MiB buffer, and nothing is written
anywhere (the sink is /dev/null). Set against the plain copy, it shows what
reading on one event loop costs before any protocol work.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence

from plain_copy import BUFFER, DONE, emit


async def receive(connections: int) -> int:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    received = [0]
    first: list[float] = []
    ended = [0]

    class Copy(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buffer = memoryview(bytearray(BUFFER))

        def get_buffer(self, sizehint: int) -> memoryview:
            return self.buffer

        def buffer_updated(self, nbytes: int) -> None:
            if not first:
                first.append(time.monotonic())
            received[0] += nbytes

        def eof_received(self) -> bool:
            ended[0] += 1
            if ended[0] == connections and not done.done():
                done.set_result(None)
            return False

    server = await loop.create_server(Copy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    emit(event="listening", address=f"tcp:127.0.0.1:{port}")
    await done
    seconds = time.monotonic() - first[0] if first else 0.0
    server.close()
    emit(event=DONE, bytes=received[0], seconds=seconds, end=time.time(), errors=[])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args(argv)
    if args.loop == "uvloop":
        import uvloop

        return uvloop.run(receive(args.connections))
    return asyncio.run(receive(args.connections))


if __name__ == "__main__":
    raise SystemExit(main())
