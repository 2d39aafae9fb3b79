#!/usr/bin/python3
"""Open a machine's terminal (/_pty) over WebSocket.

    tools/term.py [--cacert FILE] [--key KEY] [--command CMD] URL

URL is wss://SLUG.DOMAIN:PORT/_pty, optionally with ?session=ID to
reattach or ?__justavps_ticket=TICKET instead of a key. --key (or the
JUSTAVPS_KEY variable) sends an API key with the exec scope.

With --command, the shell runs CMD and then `exit`; the output goes to
stdout and the exit status is the shell's. Without it and with a terminal
on stdin, the session is interactive until the shell exits. Input from a
pipe is sent as it is.

Uses python3-websockets (Debian package); the terminal's wire form is raw
bytes in binary frames and JSON control messages in text frames.
"""
import argparse
import asyncio
import json
import os
import ssl
import sys
import urllib.parse

import websockets


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="wss://SLUG.DOMAIN:PORT/_pty")
    parser.add_argument("--cacert", help="CA certificate file to trust")
    parser.add_argument("--key", default=os.environ.get("JUSTAVPS_KEY"),
                        help="API key sent as Authorization: Bearer")
    parser.add_argument("--command", help="run this, then exit the shell")
    return parser.parse_args()


async def send_input(ws, args, interactive):
    loop = asyncio.get_running_loop()
    if args.command is not None:
        await ws.send((args.command + "\nexit\n").encode())
        return
    if interactive:
        cols, rows = os.get_terminal_size()
        await ws.send(json.dumps({"type": "resize", "cols": cols,
                                  "rows": rows}))
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        data = await reader.read(4096)
        if not data:
            return
        await ws.send(data)


async def run(args, interactive):
    context = None
    if args.url.startswith("wss:"):
        context = ssl.create_default_context(cafile=args.cacert)
    headers = {}
    if args.key:
        headers["Authorization"] = "Bearer " + args.key

    # Names under .localhost are loopback (RFC 6761), as curl and browsers
    # treat them, but the C library's resolver may not know them.
    target = urllib.parse.urlsplit(args.url)
    connect = {}
    if target.hostname == "localhost" or \
            target.hostname.endswith(".localhost"):
        default_port = 443 if target.scheme == "wss" else 80
        connect = {"host": "127.0.0.1", "port": target.port or default_port}
        if context is not None:
            connect["server_hostname"] = target.hostname

    code = 1
    async with websockets.connect(args.url, ssl=context,
                                  extra_headers=headers, max_size=None,
                                  **connect) as ws:
        sender = asyncio.create_task(send_input(ws, args, interactive))
        async for message in ws:
            if isinstance(message, bytes):
                sys.stdout.buffer.write(message)
                sys.stdout.buffer.flush()
                continue
            control = json.loads(message)
            if control.get("type") == "session":
                print("session " + control.get("id", ""), file=sys.stderr)
            elif control.get("type") == "exit":
                code = control.get("code") or 0
                break
        sender.cancel()
    return code


def main():
    args = parse_args()
    interactive = args.command is None and sys.stdin.isatty()
    saved = None
    if interactive:
        import termios
        import tty
        saved = termios.tcgetattr(sys.stdin)
        tty.setraw(sys.stdin)
    try:
        code = asyncio.run(run(args, interactive))
    except (OSError, websockets.exceptions.WebSocketException) as err:
        print("term.py: " + str(err), file=sys.stderr)
        code = 1
    finally:
        if saved is not None:
            import termios
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
    sys.exit(code)


if __name__ == "__main__":
    main()
