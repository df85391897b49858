"""Load test of the HTTP API on 127.0.0.1, for both backends, next to a bare forward pass.

    python bench/api.py                      # models/model.pt + models/model.onnx, 8 clients, 10 s each
    python bench/api.py --clients 16 --seconds 30 --backends onnx

Per backend: (1) the bare single-image forward pass in this process (converted features in, logits out) and
the whole in-process path (PNG bytes -> decode -> convert -> forward); (2) one client sending single valid
images one after another (the latency a lone user sees); (3) N concurrent clients for T seconds mixing valid
uploads (1-4 images) with malformed ones (non-image, truncated, empty, too many files, too large a file).
Prints requests/s, p50/p99 latency and responses by status code. Goals: no 5xx; p50 of a single-image request
within 2x of the bare forward pass. Server and clients share this machine's cores.

    python bench/api.py --hostile            # hostile load on the torch backend, the server's default limits

`--hostile`: 32 clients each sending the largest upload the default limits allow (16 white 4000x4000 RGBA PNGs of
about 70 KB, 16 Mpx each, cheap to send and costly to convert), next to 2 clients sending single real glyphs.
Prints the server's peak RSS (VmHWM), p50/p99 of the normal requests and the count of 5xx. Targets on 2 cores:
peak RSS < 1.5 GB, no 5xx, normal p99 < 2 s.

    python bench/api.py --hostile --attacks slow-heads huge-heads    # the attacks on request heads only

`--hostile` also runs two attacks on request heads, each against plain `uvicorn oracle_mnist.api:app` and against
the same command with `--http oracle_mnist.server:HttpToolsProtocol` (what `oracle-mnist serve` and the API image
run), while a prober asks GET /health on a new connection every 50 ms (5 s timeout) as a health checker would:
- slow-heads: 1,500 connections each send a request line, then one header line a second, for 20 s; once a
  second, those the server closed are reopened. Both servers run under an open-file limit of 1,024 (a common default), so a
  bench-sized flood shows what ~20k connections do under this machine's limit of 20,000.
- huge-heads: requests with a 100 MB header, one after the other, for 20 s and at least three of them (each
  bounded to 120 s).
Prints /health p50/p99/max and failures, the server's open sockets, CPU seconds and peak RSS. Targets for the
guarded server: every /health answered, p99 < 1 s under both attacks.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import os
import resource
import selectors
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from oracle_mnist.datasets import load_features
from oracle_mnist.inference import Predictor, open_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
# tests/helpers.py holds the server runner shared by tests and benches.
from helpers import free_port, serve_command, serve_in_subprocess, uvicorn_command

# Server limits for the run: small enough that the malformed "too large" upload stays cheap to send.
LIMITS = {"ORACLE_MNIST_MAX_FILES": "8", "ORACLE_MNIST_MAX_FILE_BYTES": "131072"}


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def time_calls(fn: Callable[[], object], seconds: float, min_calls: int = 20) -> list[float]:
    fn()  # warm-up: first calls allocate
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < min_calls:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def request_mix(glyphs: list[bytes]) -> list[tuple[str, list]]:
    """(kind, multipart files) in the order clients cycle through: 3 valid for every malformed one."""
    noise = io.BytesIO()
    Image.effect_noise((400, 400), 80).save(noise, "PNG")
    malformed = [
        ("non-image", [("files", ("notes.txt", b"plain text, not an image", "text/plain"))]),
        ("truncated", [("files", ("cut.png", glyphs[0][: len(glyphs[0]) // 2], "image/png"))]),
        ("empty", [("files", ("empty.png", b"", "image/png"))]),
        ("too-many-files", [("files", (f"{i}.png", glyphs[0], "image/png")) for i in range(9)]),
        ("too-large-file", [("files", ("noise.png", noise.getvalue(), "image/png"))]),
    ]
    mix = []
    for i, bad in enumerate(malformed):
        for j in range(3):
            n = 1 + (i + j) % 4
            mix.append(
                (
                    "valid",
                    [
                        ("files", (f"{k}.png", glyphs[(i + j + k) % len(glyphs)], "image/png"))
                        for k in range(n)
                    ],
                )
            )
        mix.append(bad)
    return mix


def load(url: str, mix: list[tuple[str, list]], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    statuses: Counter = Counter()
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            i = offset
            while time.perf_counter() < deadline:
                _, files = mix[i % len(mix)]
                start = time.perf_counter()
                try:
                    status = http.post("/predict", files=files).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    statuses[status] += 1
                i += 1

    threads = [threading.Thread(target=client, args=(k * 7,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 60)
    wall = time.perf_counter() - start
    return {
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "latencies": latencies,
        "statuses": statuses,
    }


def single_requests(url: str, glyphs: list[bytes], seconds: float) -> list[float]:
    with httpx.Client(base_url=url, timeout=30) as http:
        counter = iter(range(10**9))

        def one() -> None:
            data = glyphs[next(counter) % len(glyphs)]
            resp = http.post("/predict", files=[("files", ("g.png", data, "image/png"))])
            resp.raise_for_status()

        return time_calls(one, seconds)


def server_pid() -> int:
    """The uvicorn child of this process (serve_in_subprocess runs exactly one)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            return int(stat.parent.name)
    raise RuntimeError("no server child process found")


def memory_mb(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak so far) of `pid` in MB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def hostile_files(count: int) -> list:
    buf = io.BytesIO()
    Image.new("RGBA", (4000, 4000), (255, 255, 255, 255)).save(buf, "PNG")
    return [("files", (f"white{i}.png", buf.getvalue(), "image/png")) for i in range(count)]


def hostile_load(url: str, glyphs: list[bytes], args: argparse.Namespace) -> dict:
    """Hostile clients in a loop next to normal ones; latencies and statuses per kind."""
    heavy = hostile_files(args.hostile_files)
    latencies: dict[str, list[float]] = {"hostile": [], "normal": []}
    statuses: dict[str, Counter] = {"hostile": Counter(), "normal": Counter()}
    lock = threading.Lock()
    deadline = time.perf_counter() + args.seconds

    def client(kind: str, offset: int) -> None:
        with httpx.Client(base_url=url, timeout=900) as http:
            i = offset
            while time.perf_counter() < deadline:
                files = (
                    heavy
                    if kind == "hostile"
                    else [("files", ("g.png", glyphs[i % len(glyphs)], "image/png"))]
                )
                start = time.perf_counter()
                try:
                    status = http.post("/predict", files=files).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    latencies[kind].append(time.perf_counter() - start)
                    statuses[kind][status] += 1
                i += 1

    threads = [threading.Thread(target=client, args=("hostile", k)) for k in range(args.clients)]
    threads += [threading.Thread(target=client, args=("normal", k)) for k in range(args.normal_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=args.seconds + 900)
    return {"latencies": latencies, "statuses": statuses}


def bench_hostile(model: Path, images: np.ndarray, args: argparse.Namespace) -> None:
    glyphs = [png(g) for g in images[:32]]
    env = {"ORACLE_MNIST_MODEL": str(model), "ORACLE_MNIST_THREADS": str(args.threads)}
    with serve_in_subprocess(env) as url:
        pid = server_pid()
        idle = memory_mb(pid, "VmRSS")
        result = hostile_load(url, glyphs, args)
        peak, after = memory_mb(pid, "VmHWM"), memory_mb(pid, "VmRSS")
    normal = result["latencies"]["normal"]
    five_xx = sum(
        n
        for counter in result["statuses"].values()
        for s, n in counter.items()
        if not isinstance(s, int) or s >= 500
    )
    print(
        f"\n== hostile load: {args.clients} clients x {args.hostile_files} white 4000x4000 RGBA PNGs, "
        f"{args.normal_clients} normal clients, {args.seconds:.0f} s"
    )
    print(f"server RSS: idle {idle:.0f} MB, peak {peak:.0f} MB, after {after:.0f} MB (target peak < 1500 MB)")
    print(
        f"normal requests: {len(normal)}, p50 {ms(percentile(normal, 50))} ms, "
        f"p99 {ms(percentile(normal, 99))} ms (target p99 < 2000 ms)"
    )
    for kind, counter in result["statuses"].items():
        print(
            f"  {kind} responses by status: "
            + ", ".join(f"{s}: {n}" for s, n in sorted(counter.items(), key=lambda kv: str(kv[0])))
        )
    print(f"5xx/errors: {five_xx} (target 0)")


# --- attacks on request heads ---------------------------------------------------------------------------------

GUARDED_HTTP = ["--http", "oracle_mnist.server:HttpToolsProtocol"]
SERVERS = {"plain uvicorn": [], "uvicorn --http oracle_mnist.server:HttpToolsProtocol": GUARDED_HTTP}


@contextlib.contextmanager
def head_attack_server(model: Path, http_args: list[str], nofile: int | None) -> Iterator[tuple[str, int]]:
    """`uvicorn oracle_mnist.api:app` plus `http_args` on a free port, under an open-file limit of `nofile`
    (prlimit execs the server, so its pid is this process's child); yields (base URL, server pid)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [*uvicorn_command(port), "--no-access-log", "--log-level", "warning", *http_args]
    if nofile is not None:
        cmd = ["prlimit", f"--nofile={nofile}:{nofile}", "--", *cmd]
    with serve_command(cmd, f"{url}/health", {"ORACLE_MNIST_MODEL": str(model)}):
        yield url, server_pid()


class Prober:
    """GET /health on a new connection every `interval` s (`timeout` s each) until stopped: a health checker."""

    def __init__(self, url: str, interval: float = 0.05, timeout: float = 5.0) -> None:
        self.host, self.port = url.removeprefix("http://").split(":")
        self.interval, self.timeout = interval, timeout
        self.latencies: list[float] = []
        self.failures: Counter = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _probe(self) -> None:
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=self.timeout)
        start = time.perf_counter()
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                self.failures[resp.status] += 1
                return
            self.latencies.append(time.perf_counter() - start)
        except (OSError, http.client.HTTPException) as exc:
            self.failures[type(exc).__name__] += 1
        finally:
            conn.close()

    def _run(self) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            self._probe()
            self.stop.wait(max(0.0, self.interval - (time.perf_counter() - start)))

    def __enter__(self) -> Prober:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=self.timeout + 5)

    def summary(self) -> str:
        lat = self.latencies
        total = len(lat) + sum(self.failures.values())
        failed = ", ".join(f"{k}: {n}" for k, n in self.failures.items()) or "none"
        return (
            f"/health answered {len(lat)}/{total}, p50 {ms(percentile(lat, 50))} ms, "
            f"p99 {ms(percentile(lat, 99))} ms, max {ms(max(lat, default=float('nan')))} ms; failed: {failed}"
        )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


def slow_heads(url: str, pid: int, count: int, seconds: float) -> dict:
    """`count` connections that send a request line and then one header line a second, for `seconds`; once a
    second, those the server closed are reopened (at most `count` x `seconds` openings in all)."""
    host, port = url.removeprefix("http://").split(":")
    sel = selectors.DefaultSelector()
    stats = {"opened": 0, "closed by server": 0, "connect failures": 0, "max server sockets": 0}

    def top_up() -> None:
        for _ in range(count - len(sel.get_map())):
            stats["opened"] += 1
            try:
                sock = socket.create_connection((host, int(port)), timeout=2)
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            except OSError:
                stats["connect failures"] += 1
                continue
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)

    def drop(sock: socket.socket) -> None:
        sel.unregister(sock)
        sock.close()
        stats["closed by server"] += 1

    deadline = time.monotonic() + seconds
    next_tick = time.monotonic()
    while time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.1):  # readable: an answer (408) or the server's close
            drop(key.fileobj)
        if time.monotonic() >= next_tick:
            next_tick += 1
            for key in list(sel.get_map().values()):
                try:
                    key.fileobj.send(b"X-Slow: 1\r\n")
                except OSError:
                    drop(key.fileobj)
            top_up()
            stats["max server sockets"] = max(stats["max server sockets"], open_sockets(pid))
    stats["server sockets at the end"] = open_sockets(pid)
    stats["attacker connections open at the end"] = len(sel.get_map())
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    sel.close()
    return stats


def huge_head(url: str, request: bytes) -> str:
    """Send `request` (a huge head); the server's status line, or what went wrong."""
    host, port = url.removeprefix("http://").split(":")
    answer, error = b"", "closed without an answer"
    with socket.create_connection((host, int(port)), timeout=120) as sock:

        def send() -> None:
            with contextlib.suppress(OSError):  # a server that refuses early stops reading
                sock.sendall(request)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError as exc:
            error = type(exc).__name__
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # ends a send still in progress
        sender.join(timeout=130)
    return answer.split(b"\r\n")[0].decode() or error


def bench_head_attacks(model: Path, args: argparse.Namespace) -> None:
    if "slow-heads" in args.attacks:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if args.slow_connections > soft - 256:  # this process holds them all, beside its probes
            raise SystemExit(
                f"--slow-connections {args.slow_connections}: over this process's open-file limit {soft} - 256"
            )
        print(
            f"\n== slow heads: {args.slow_connections} connections sending a request line, then a header line a "
            f"second, those closed reopened once a second, {args.attack_seconds:.0f} s; servers under an open-file limit of "
            f"{args.server_nofile}"
        )
        for name, http_args in SERVERS.items():
            with head_attack_server(model, http_args, args.server_nofile) as (url, pid):
                with Prober(url) as idle:
                    time.sleep(2)
                cpu = cpu_seconds(pid)
                with Prober(url) as probe:
                    stats = slow_heads(url, pid, args.slow_connections, args.attack_seconds)
                cpu = cpu_seconds(pid) - cpu
                peak = memory_mb(pid, "VmHWM")
            print(f"{name}:")
            print(f"  idle:         {idle.summary()}")
            print(f"  under attack: {probe.summary()}")
            print(
                f"  server: {cpu:.1f} CPU s, peak RSS {peak:.0f} MB; "
                + ", ".join(f"{k} {v}" for k, v in stats.items())
            )
    if "huge-heads" in args.attacks:
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: "
        request += b"a" * (args.huge_head_mb << 20) + b"\r\n\r\n"
        print(
            f"\n== huge heads: requests with a {args.huge_head_mb} MB header one after another, for "
            f"{args.attack_seconds:.0f} s and at least {args.huge_heads} of them"
        )
        for name, http_args in SERVERS.items():
            with head_attack_server(model, http_args, None) as (url, pid):
                cpu, start = cpu_seconds(pid), time.perf_counter()
                answers: Counter = Counter()
                with Prober(url) as probe:
                    deadline = time.monotonic() + args.attack_seconds
                    while time.monotonic() < deadline or answers.total() < args.huge_heads:
                        answers[huge_head(url, request)] += 1
                cpu, wall = cpu_seconds(pid) - cpu, time.perf_counter() - start
                peak = memory_mb(pid, "VmHWM")
            print(f"{name}:")
            print(f"  under attack: {probe.summary()}")
            print(
                f"  server: {cpu:.1f} CPU s over {wall:.1f} s, peak RSS {peak:.0f} MB; answers: "
                + ", ".join(f"{k} x{n}" for k, n in answers.items())
            )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def bench_backend(backend: str, model: Path, images: np.ndarray, args: argparse.Namespace) -> None:
    predictor = Predictor.from_file(model, backend, args.threads)
    one = images[:1]
    glyphs = [png(g) for g in images[:32]]
    bare = time_calls(lambda: predictor.logits(one), args.single_seconds)
    in_process = time_calls(
        lambda: predictor.predict([open_image(glyphs[0], "g.png", 10**6)]), args.single_seconds
    )
    env = {
        "ORACLE_MNIST_MODEL": str(model),
        "ORACLE_MNIST_BACKEND": backend,
        "ORACLE_MNIST_THREADS": str(args.threads),
        **LIMITS,
    }
    with serve_in_subprocess(env) as url:
        single = single_requests(url, glyphs, args.single_seconds)
        loaded = load(url, request_mix(glyphs), args.clients, args.seconds)
    bare_p50, single_p50 = statistics.median(bare), statistics.median(single)
    five_xx = sum(n for s, n in loaded["statuses"].items() if not isinstance(s, int) or s >= 500)
    print(f"\n== backend {backend} ({predictor.meta.model_name}, {model}, {args.threads} thread(s) per pass)")
    print(f"bare forward, 1 image          p50 {ms(bare_p50)} ms   p99 {ms(percentile(bare, 99))} ms")
    print(f"in-process PNG->class, 1 image p50 {ms(statistics.median(in_process))} ms")
    print(
        f"HTTP, 1 client, 1 image        p50 {ms(single_p50)} ms   p99 {ms(percentile(single, 99))} ms   "
        f"= {single_p50 / bare_p50:.2f}x bare forward (goal <= 2x: {'met' if single_p50 <= 2 * bare_p50 else 'NOT met'})"
    )
    lat = loaded["latencies"]
    print(
        f"HTTP, {args.clients} clients, mixed, {args.seconds:.0f} s: {loaded['requests']} requests, "
        f"{loaded['rps']:.1f} req/s, p50 {ms(percentile(lat, 50))} ms, p99 {ms(percentile(lat, 99))} ms"
    )
    print(
        "  responses by status: "
        + ", ".join(f"{s}: {n}" for s, n in sorted(loaded["statuses"].items(), key=lambda kv: str(kv[0])))
        + f"   5xx/errors: {five_xx} (goal 0: {'met' if five_xx == 0 else 'NOT met'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--onnx", type=Path, default=Path("models/model.onnx"))
    parser.add_argument(
        "--images", type=Path, default=Path("data/features/test.npz"), help="real test images"
    )
    parser.add_argument("--backends", nargs="+", choices=("torch", "onnx"), default=["torch", "onnx"])
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (8; 32 hostile ones)")
    parser.add_argument("--hostile", action="store_true", help="the hostile-load run instead (torch only)")
    parser.add_argument(
        "--attacks",
        nargs="+",
        choices=("uploads", "slow-heads", "huge-heads"),
        default=["uploads", "slow-heads", "huge-heads"],
        help="which hostile loads --hostile runs (default: all)",
    )
    parser.add_argument("--slow-connections", type=int, default=1500, help="slow-heads: connections held")
    parser.add_argument("--attack-seconds", type=float, default=20.0, help="length of each head attack")
    parser.add_argument(
        "--server-nofile", type=int, default=1024, help="slow-heads: the servers' open-file limit"
    )
    parser.add_argument("--huge-heads", type=int, default=3, help="huge-heads: requests sent at least")
    parser.add_argument("--huge-head-mb", type=int, default=100, help="huge-heads: MB in each header")
    parser.add_argument("--hostile-files", type=int, default=16, help="16 Mpx images per hostile request")
    parser.add_argument("--normal-clients", type=int, default=2, help="normal clients next to hostile ones")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the concurrent phase")
    parser.add_argument("--single-seconds", type=float, default=3.0, help="length of each single-image phase")
    parser.add_argument(
        "--threads", type=int, default=1, help="cores per forward pass, in-process and server"
    )
    args = parser.parse_args()
    if args.hostile:
        args.clients = 32 if args.clients is None else args.clients
        if "uploads" in args.attacks:
            bench_hostile(args.model, load_features(args.images)[0], args)
        bench_head_attacks(args.model, args)
        return
    images, _ = load_features(args.images)
    args.clients = 8 if args.clients is None else args.clients
    for backend in args.backends:
        bench_backend(backend, args.model if backend == "torch" else args.onnx, images, args)


if __name__ == "__main__":
    main()
