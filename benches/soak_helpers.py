#!/usr/bin/env python3
"""Helpers of benches/soak.sh, standard library only.

  soak_helpers.py throttle LISTEN_PORT TARGET_PORT BYTES_PER_S
      A TCP proxy whose server-to-client direction is capped at BYTES_PER_S per connection:
      a client behind it reads its answers slowly, so the server must hold them meanwhile.
  soak_helpers.py flood TARGET_PORT CONNECTIONS HOLD_S SECONDS
      Every HOLD_S seconds opens CONNECTIONS TCP connections that never send a byte and
      drops the previous round, for SECONDS; prints how many the server closed first.
"""

import asyncio
import socket
import sys
import time


async def throttle(listen_port: int, target_port: int, rate: int) -> None:
    async def pipe(reader, writer, cap):
        try:
            while True:
                chunk = await reader.read(min(cap or 65536, 65536) if cap else 65536)
                if not chunk:
                    break
                writer.write(chunk)
                await writer.drain()
                if cap:
                    await asyncio.sleep(len(chunk) / cap)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, server_w, 0), pipe(server_r, client_w, rate))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


def flood(target_port: int, n: int, hold: float, seconds: float) -> None:
    end = time.monotonic() + seconds
    rounds = closed_by_server = opened = 0
    previous: list[socket.socket] = []
    while time.monotonic() < end:
        current = []
        for _ in range(n):
            try:
                s = socket.create_connection(("127.0.0.1", target_port), timeout=2)
                s.setblocking(False)
                current.append(s)
                opened += 1
            except OSError:
                break
        time.sleep(hold)
        for s in previous:
            # The server speaks first (its HTTP/2 settings): drain that, then look for the close.
            try:
                while s.recv(65536):
                    pass
                closed_by_server += 1
            except BlockingIOError:
                pass
            except OSError:
                closed_by_server += 1
            s.close()
        previous = current
        rounds += 1
    for s in previous:
        s.close()
    print(f"flood: {rounds} rounds, {opened} silent connections opened, {closed_by_server} closed by the server first")


def main() -> None:
    mode = sys.argv[1]
    if mode == "throttle":
        asyncio.run(throttle(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
    elif mode == "flood":
        flood(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
