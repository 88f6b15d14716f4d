"""Load test of `cbtm serve` on loopback: 1, 4, 16 and 32 concurrent clients, fixed prompts, bounded in count.

    python bench/serve.py [--run runs/demo] [--clients 1,4,16,32] [--requests 8] [--tokens 64]

Starts `cbtm serve RUN` as a subprocess on a free port of 127.0.0.1, then per level of concurrency each client
thread sends ``--requests`` streaming completions one after another (greedy, ``--tokens`` new tokens, prompts in
a fixed rotation). Prints p50/p99 latency, p50 time to first token and aggregate completion tokens/s, against
the single-client figure of the same run. The clients share one asyncio loop over raw sockets, so that
they take little of the CPU the server runs on. Target on the demo run (2 CPU cores): >= 4x aggregate tokens/s at 16
clients vs 1.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Bread dough should rise", "The goalkeeper", "The court ruled that", "The telescope",
           "The patient was given", "The compiler reports", "Knead the dough", "The striker scored"]


async def one_request(port: int, prompt: str, tokens: int) -> tuple[float, float, int]:
    """(latency s, time to first token s, completion tokens) of one streaming completion, over a raw asyncio
    socket: the load generator must cost the 2 shared cores far less than the server it measures (an httpx client
    per thread parsing every chunk used as much CPU as the server)."""
    body = json.dumps({"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    first, used, tail = None, 0, b""
    while chunk := await reader.read(65536):
        if first is None and b'"text": "' in chunk.replace(b'"text": ""', b""):
            first = time.perf_counter() - start  # the first chunk that carries text
        tail = (tail + chunk)[-4096:]
    writer.close()
    match = re.search(rb'"completion_tokens": (\d+)', tail)
    used = int(match.group(1)) if match else 0
    return time.perf_counter() - start, first or 0.0, used


def level(port: int, clients: int, requests: int, tokens: int) -> dict:
    async def client(c: int) -> list:
        return [await one_request(port, PROMPTS[(c + r) % len(PROMPTS)], tokens) for r in range(requests)]

    async def everyone():
        return [r for rs in await asyncio.gather(*(client(c) for c in range(clients))) for r in rs]

    start = time.perf_counter()
    results = asyncio.run(everyone())
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": sum(r[2] for r in results), "wall": wall,
            "p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "ttft": statistics.median(r[1] for r in results), "tok_s": sum(r[2] for r in results) / wall}


def start_server(run: str, extra: list[str]) -> tuple[subprocess.Popen, int]:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", run, "--port", str(port), *extra], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, port
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"the server did not start: {proc.stderr.read()[-2000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--clients", default="1,4,16,32")
    p.add_argument("--requests", type=int, default=8, help="requests per client at each level")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--server-args", default="", help="extra `cbtm serve` flags, e.g. '--max-batch-size 64'")
    args = p.parse_args()
    proc, port = start_server(args.run, args.server_args.split())
    try:
        level(port, 8, 1, 8)  # warm-up: every expert the prompts route to is loaded
        rows = [level(port, int(c), args.requests, args.tokens) for c in args.clients.split(",")]
    finally:
        proc.terminate()
        proc.wait(20)
    base = rows[0]["tok_s"]
    print(f"cbtm serve {args.run}: {args.requests} streaming requests per client, {args.tokens} new tokens, greedy, "
          f"{os.cpu_count()} CPUs (server and clients share them)")
    print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'p50 s':>7} {'p99 s':>7} {'TTFT p50 s':>10} {'tok/s':>8} "
          f"{'vs 1 client':>11}")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['tokens']:>7} {r['p50']:>7.2f} {r['p99']:>7.2f} "
              f"{r['ttft']:>10.3f} {r['tok_s']:>8.1f} {r['tok_s'] / base:>10.2f}x")
    at16 = next((r for r in rows if r["clients"] == 16), None)
    if at16:
        gain = at16["tok_s"] / base
        print(f"16 clients vs 1: {gain:.2f}x aggregate tokens/s: {'met' if gain >= 4 else 'MISSED'} (target >= 4x)")


if __name__ == "__main__":
    main()
