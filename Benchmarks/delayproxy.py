#!/usr/bin/env python3
"""A TCP proxy that delays every chunk by DELAY_MS in each direction (RTT + 2 x DELAY_MS), preserving order.
Stands in for tc netem, which this kernel lacks (`tc qdisc add ... netem` -> "Specified qdisc kind is unknown").

    delayproxy.py LISTEN_PORT TARGET_PORT DELAY_MS [LISTEN_PORT TARGET_PORT DELAY_MS ...]   (127.0.0.1 only)
"""
import asyncio
import sys


async def pump(reader, writer, delay):
    loop = asyncio.get_running_loop()
    q = asyncio.Queue()

    async def sender():
        while True:
            due, data = await q.get()
            d = due - loop.time()
            if d > 0:
                await asyncio.sleep(d)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        try:
            writer.close()
        except Exception:
            pass

    task = asyncio.create_task(sender())
    try:
        while True:
            data = await reader.read(262144)
            q.put_nowait((loop.time() + delay, data))
            if not data:
                break
    except Exception:
        q.put_nowait((loop.time() + delay, b""))
    await task


def handler(target, delay):
    async def handle(cr, cw):
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            cw.close()
            return
        await asyncio.gather(pump(cr, sw, delay), pump(sr, cw, delay), return_exceptions=True)
    return handle


async def main(specs):
    servers = [await asyncio.start_server(handler(t, d / 1000), "127.0.0.1", lp) for lp, t, d in specs]
    print("delayproxy ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    a = sys.argv[1:]
    asyncio.run(main([(int(a[i]), int(a[i + 1]), float(a[i + 2])) for i in range(0, len(a), 3)]))
