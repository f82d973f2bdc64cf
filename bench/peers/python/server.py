"""A Python inbound-call server written the way a typical `websockets` user would: answer on
incoming_call, echo audio, wait for the CDR after hangup, then close."""
import asyncio
import json
import sys

from websockets.asyncio.server import serve


async def handler(ws):
    async for message in ws:
        if isinstance(message, bytes):
            await ws.send(message)
            continue
        try:
            msg = json.loads(message)
        except ValueError:
            await ws.close(1007, "invalid JSON")
            return
        if msg.get("event") == "incoming_call":
            await ws.send(json.dumps({"event": "answer"}))
        elif msg.get("event") == "cdr":
            await ws.close(1000, "call ended")
            return


async def main():
    host, port = (sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:4152").split(":")
    async with serve(handler, host, int(port), max_size=2**20):
        await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    asyncio.run(main())
