"""Capture's added latency on the router's request path (issue 24; target: < 1 ms at p99).

The adapter router runs in this process in front of a stub engine (instant JSON chat answers, its own
process); 50 concurrent clients (keep-alive connections, their own process so they do not share the
router's interpreter lock) send N chat completions with capture off, then N with capture on (sampleRate 1.0,
flushSeconds 1, redaction of all three kinds, written to a moto S3 server in its own process, as the trainer
tests do), in 5 rounds of off-then-on so the machine's other load falls on both alike. Prints

    capture latency: off p50 X ms p99 Y ms | on p50 X ms p99 Y ms (N requests, 50 concurrent)

plus what the writer wrote, so the records are known to have been captured while being timed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

BUCKET = "capture-bench"
PROMPT = "My e-mail is jane.doe@example.com and my card 4111 1111 1111 1111; what is the refund policy?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class StubEngine(BaseHTTPRequestHandler):
    """vLLM's shape, answered at once: /health, /v1/models, the LoRA calls and chat completions."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    count = 0

    def log_message(self, *args: Any) -> None:
        pass

    def reply(self, document: Any) -> None:
        body = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.reply({"object": "list", "data": [{"id": "base"}, {"id": "bot-v1"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubEngine.count += 1
        message = {"role": "assistant", "content": "Refunds within 30 days; write to help@example.com."}
        answer = {
            "id": f"chatcmpl-{StubEngine.count}",
            "object": "chat.completion",
            "model": body.get("model"),
        }
        self.reply({**answer, "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})


class EngineServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the router opens a connection per request: 50 at once


def run_engine(port: int) -> None:
    server = EngineServer(("127.0.0.1", port), StubEngine)
    server.serve_forever()


def run_clients(port: int, total: int, clients: int, out: Any) -> None:
    """`clients` threads, one keep-alive connection each, `total` requests in all; latencies (s) to `out`."""
    body = json.dumps({"model": "bot", "messages": [{"role": "user", "content": PROMPT}]}).encode()
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[float] = []
        while True:
            with lock:
                if next(counter, None) is None:
                    break
            began = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            mine.append(time.perf_counter() - began)
            if response.status != 200:
                with lock:
                    failures.append(response.status)
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.send({"latencies": latencies, "failures": failures})


def measure(port: int, total: int, clients: int) -> list[float]:
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=run_clients, args=(port, total, clients, send))
    process.start()
    result = receive.recv()
    process.join()
    if result["failures"]:
        raise SystemExit(f"{len(result['failures'])} requests failed: {sorted(set(result['failures']))}")
    return [float(x) for x in result["latencies"]]


def quantiles_ms(latencies: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return cuts[49] * 1000, cuts[98] * 1000


def start_moto(port: int) -> subprocess.Popen[bytes]:
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    process = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.1)
    process.kill()
    raise SystemExit("moto_server did not start")


def s3_env(port: int) -> None:
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        os.environ.pop(name, None)


def time_request_path(proxy: Any, capture: Any) -> list[float]:
    """Wrap the request path's capture work (the sampling decision with its body check, and the enqueue
    after the answer) with timers; the durations (s) of each call land in the list returned."""
    spent: list[float] = []

    def timed(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - began)

        setattr(owner, name, wrapper)

    timed(proxy, "sample")
    timed(capture, "offer")
    return spent


def start_router(
    engine_port: int, destination: str, stop: threading.Event
) -> tuple[Any, int, threading.Thread]:
    """The router in this process, its public port (returned) serving, its capture writer (returned) running
    until `stop` is set."""
    from finetune_trainer.adapter_router import PublicServer, Router, Vllm, proxy_handler

    router = Router(
        Vllm(f"http://127.0.0.1:{engine_port}"),
        Path(tempfile.mkdtemp(prefix="bench-capture-")),
        fetch=lambda uri, dest: dest.mkdir(parents=True, exist_ok=True),
        sources=[f"s3://{BUCKET}/adapters"],
        destinations=[destination],
    )
    router.start(None, wait_seconds=30)
    public = PublicServer(("127.0.0.1", 0), proxy_handler(router))
    threading.Thread(target=public.serve_forever, daemon=True).start()
    writer = threading.Thread(target=router.capture.run, args=(stop,), daemon=True)
    writer.start()
    return router, int(public.server_address[1]), writer


def run(args: argparse.Namespace, engine_port: int) -> int:
    from finetune_trainer.adapter_router import Proxy

    destination = f"s3://{BUCKET}/capture"
    stop = threading.Event()
    router, port, writer = start_router(engine_port, destination, stop)
    state = {"adapters": {"bot-v1": f"s3://{BUCKET}/adapters/v1"}, "routes": {"bot": "bot-v1"}}
    router.apply_state(router.check(state))
    measure(port, min(args.requests, 1000), args.clients)  # warm-up: connections, caches
    capture = {"prefix": f"{destination}/bench/pool", "sampleRate": 1.0, "flushSeconds": 1}
    spent = time_request_path(Proxy, router.capture)
    off: list[float] = []
    on: list[float] = []
    # Off then on, in rounds: the machine's other load drifts, and must fall on both phases alike.
    for index in range(args.rounds):
        share = args.requests // args.rounds + (index < args.requests % args.rounds)
        router.apply_state(router.check(state))
        off += measure(port, share, args.clients)
        router.apply_state(router.check({**state, "capture": capture}))
        on += measure(port, share, args.clients)
    stop.set()
    writer.join(60)
    counters = router.capture.counters()
    (off50, off99), (on50, on99) = quantiles_ms(off), quantiles_ms(on)
    print(
        f"capture latency: off p50 {off50:.2f} ms p99 {off99:.2f} ms | on p50 {on50:.2f} ms "
        f"p99 {on99:.2f} ms ({args.requests} requests, {args.clients} concurrent)"
    )
    path50, path99 = quantiles_ms(spent)
    print(f"captured: {json.dumps(counters)} (p99 added end to end: {on99 - off99:+.2f} ms)")
    print(f"capture work on the request path per call: p50 {path50:.3f} ms p99 {path99:.3f} ms")
    return 0 if counters["records"] == args.requests and counters["failures"] == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000, help="requests per phase (off, then on)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument(
        "--rounds", type=int, default=5, help="off/on alternations the requests are split over"
    )
    args = parser.parse_args()
    from finetune_trainer.storage import s3_client

    moto_port, engine_port = free_port(), free_port()
    moto = start_moto(moto_port)
    engine = multiprocessing.get_context("spawn").Process(target=run_engine, args=(engine_port,), daemon=True)
    engine.start()
    try:
        s3_env(moto_port)
        s3_client().create_bucket(Bucket=BUCKET)
        return run(args, engine_port)
    finally:
        engine.kill()
        moto.kill()
        moto.wait()


if __name__ == "__main__":
    sys.exit(main())
