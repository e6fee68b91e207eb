#!/usr/bin/env python3
"""Soak test: mixed good and hostile traffic against a fasternet-serve it starts itself, for a
fixed time, then a report. Python stdlib only; loopback only; every loop is bounded in time.

About a third of the requests are bad input (truncated and garbage images, an aspect-ratio bomb,
a PNG whose ICC profile inflates to 1 GiB, a 100 MB declared body, wrong content types and query
parameters, too many images, a client that hangs up mid-upload, a wrong method); the rest are
valid single images, multipart and JSON batches, /embed, and heavy 12-megapixel 16-bit PNGs.

The report gives the requests sent, the statuses seen against the statuses each case allows,
the server's resident memory at the start, at the end and at its peak (VmHWM) against the memory
budget, and whether the server's /metrics counters equal what the clients saw, status by status.
Exit status 1 if any answer was outside its allowed statuses, the counters disagree, the peak
went over the budget, or the server died.

    python3 tools/soak.py --duration 600 --clients 8 --memory-budget 512MiB \\
        --report docs/soak-report.json
"""
import argparse
import base64
import collections
import http.client
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width, height, bit_depth=8, color_type=0, extra=(), seed=0):
    """A PNG whose rows are a pattern (seed 0: zeros), compressed row by row."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row_bytes = width * channels * bit_depth // 8
    compressor = zlib.compressobj(9)
    parts = []
    for y in range(height):
        row = bytes((x * 7 + y * 3 + seed) % 256 for x in range(row_bytes)) if seed else bytes(row_bytes)
        parts.append(compressor.compress(b"\0" + row))
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    chunks = png_chunk(b"IHDR", ihdr) + b"".join(png_chunk(k, d) for k, d in extra)
    return b"\x89PNG\r\n\x1a\n" + chunks + png_chunk(b"IDAT", b"".join(parts)) + png_chunk(b"IEND", b"")


def deflated_zeros(n):
    compressor = zlib.compressobj(9)
    block = bytes(1 << 20)
    out = [compressor.compress(block) for _ in range(n // len(block))]
    return b"".join(out) + compressor.flush()


def fixture(name):
    with open(os.path.join(REPO, "tests/fixtures/preprocess/inputs", name), "rb") as f:
        return f.read()


def multipart(images):
    boundary = "soakboundary42"
    body = b"".join(
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"f{i}\"; filename=\"{i}.png\"\r\n"
        f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(images))
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Case:
    """One kind of request: how to send it and which statuses are right. 503 (queue full,
    memory busy) is right for every API request under load."""

    def __init__(self, name, weight, bad, method, path, body=b"", content_type="image/png", allowed=(200,),
                 headers=None, hang_up=False):
        self.name, self.weight, self.bad = name, weight, bad
        self.method, self.path, self.body, self.content_type = method, path, body, content_type
        self.allowed = set(allowed) | ({503} if path.startswith(("/classify", "/embed")) else set())
        self.headers = headers or {}
        self.hang_up = hang_up


def cases():
    small = [png(28, 28, seed=s) for s in range(1, 9)]
    jpeg = fixture("coffee.jpg")
    iccp = png(64, 64, extra=[(b"iCCP", b"icc\0\0" + deflated_zeros(1 << 30))])
    mp, mp_type = multipart(small[:3])
    many = json.dumps({"images": [base64.b64encode(small[0]).decode()] * 65}).encode()
    two = json.dumps({"images": [base64.b64encode(small[1]).decode(), base64.b64encode(jpeg).decode()]}).encode()
    return [
        # good (about two thirds of the requests)
        Case("small PNG", 30, False, "POST", "/classify?top_k=3", small[0]),
        Case("photo PNG 451x300", 8, False, "POST", "/classify", fixture("chelsea.png")),
        Case("photo JPEG", 8, False, "POST", "/classify", jpeg, "image/jpeg"),
        Case("multipart, 3 images", 6, False, "POST", "/classify", mp, mp_type),
        Case("JSON, 2 images", 6, False, "POST", "/classify?top_k=2", two, "application/json"),
        Case("embed", 6, False, "POST", "/embed?normalize=true", small[2]),
        Case("12 MP 16-bit PNG", 2, False, "POST", "/classify", png(4000, 3000, 16, 2)),
        # bad (about a third)
        Case("JPEG cut to a third", 4, True, "POST", "/classify", jpeg[: len(jpeg) // 3], "image/jpeg", (422,)),
        Case("garbage bytes", 4, True, "POST", "/classify", os.urandom(3000), "application/octet-stream", (422,)),
        Case("100000x1 PNG", 4, True, "POST", "/classify", png(100000, 1), allowed=(413,)),
        Case("iCCP inflating to 1 GiB", 2, True, "POST", "/classify", iccp, allowed=(200,)),
        Case("100 MB declared, 100-continue", 4, True, "POST", "/classify", b"", headers={
            "Content-Length": "100000000", "Expect": "100-continue"}, allowed=(413,)),
        Case("text/plain", 3, True, "POST", "/classify", small[0], "text/plain", (415,)),
        Case("top_k=abc", 3, True, "POST", "/classify?top_k=abc", small[0], allowed=(422,)),
        Case("top_k twice", 3, True, "POST", "/classify?top_k=1&top_k=2", small[0], allowed=(422,)),
        Case("bad base64", 3, True, "POST", "/classify", b'{"images": ["%%%"]}', "application/json", (422,)),
        Case("65 images", 2, True, "POST", "/classify", many, "application/json", (413,)),
        Case("hang up mid-upload", 3, True, "POST", "/classify", small[0] * 20, hang_up=True, allowed=(499,)),
        Case("GET /classify", 3, True, "GET", "/classify", b"", allowed=(405,)),
    ]


def send(host, port, case, timeout):
    """Returns the status, or 499 for a request this client abandoned on purpose."""
    if case.hang_up:
        with socket.create_connection((host, port), timeout=timeout) as s:
            head = (f"{case.method} {case.path} HTTP/1.1\r\nHost: soak\r\nContent-Type: {case.content_type}\r\n"
                    f"Content-Length: {len(case.body)}\r\n\r\n").encode()
            s.sendall(head + case.body[: len(case.body) // 2])
        return 499
    if "Expect" in case.headers:
        with socket.create_connection((host, port), timeout=timeout) as s:
            head = f"{case.method} {case.path} HTTP/1.1\r\nHost: soak\r\nContent-Type: {case.content_type}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in case.headers.items()) + "\r\n"
            s.sendall(head.encode())
            reply = s.recv(64)
        return int(reply.split(b" ")[1]) if reply.startswith(b"HTTP/1.1 ") else -1
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"Content-Type": case.content_type} if case.method == "POST" else {}
        conn.request(case.method, case.path, body=case.body if case.method == "POST" else None, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else None


def memory(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None, None


def metric_counts(host, port):
    """{(route, status): count} from fasternet_http_requests_total."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    counts = {}
    for m in re.finditer(r'^fasternet_http_requests_total\{route="([^"]*)",status="(\d+)"\} (\d+)', text, re.M):
        counts[(m.group(1), int(m.group(2)))] = int(m.group(3))
    budget = re.search(r"^fasternet_memory_budget_bytes (\d+)", text, re.M)
    return counts, int(budget.group(1)) if budget else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", default=os.path.join(REPO, "target/release/fasternet-serve"))
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (600)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (8)")
    parser.add_argument("--memory-budget", default="512MiB", help="the server's --memory-budget (512MiB)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--report", help="write the report as JSON here too")
    parser.add_argument("server_args", nargs="*", help="more flags for the server (after --)")
    args = parser.parse_args()

    server = subprocess.Popen(
        [args.bin, "serve", "--host", "127.0.0.1", "--port", "0", "--log-format", "json",
         "--memory-budget", args.memory_budget, *args.server_args],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port, deadline = None, time.time() + 120
    while port is None and time.time() < deadline:
        line = server.stderr.readline()
        if not line:
            break
        if '"listening"' in line:
            port = int(json.loads(line)["fields"]["addr"].rsplit(":", 1)[1])
    if port is None:
        server.kill()
        sys.exit("the server did not start")
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    host = "127.0.0.1"
    all_cases = cases()
    rss_start, _ = memory(server.pid)

    seen = collections.Counter()          # (case, status)
    by_route = collections.Counter()      # (route, status), what the server should have counted
    unexpected = collections.Counter()
    lock = threading.Lock()
    stop_at = time.time() + args.duration
    rss_samples = []

    def client(index):
        rng = random.Random(args.seed * 1000 + index)
        weights = [c.weight for c in all_cases]
        while time.time() < stop_at:
            case = rng.choices(all_cases, weights)[0]
            try:
                status = send(host, port, case, timeout=60)
            except (OSError, http.client.HTTPException, ValueError, IndexError) as e:
                status = f"error: {type(e).__name__}"
            route = case.path.split("?")[0]
            with lock:
                seen[(case.name, status)] += 1
                if isinstance(status, int):
                    by_route[(route, status)] += 1
                if status not in case.allowed:
                    unexpected[(case.name, status)] += 1

    def sampler():
        while time.time() < stop_at:
            rss, _ = memory(server.pid)
            if rss:
                rss_samples.append(rss)
            time.sleep(1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    threads.append(threading.Thread(target=sampler))
    started = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - started
    time.sleep(1)  # let hang-ups be counted

    alive = server.poll() is None
    rss_end, peak = memory(server.pid)
    counts, budget = metric_counts(host, port) if alive else ({}, None)
    server_side = {k: v for k, v in counts.items() if k[0] in ("/classify", "/embed")}
    mismatches = {f"{r} {s}": {"clients": by_route.get((r, s), 0), "metrics": server_side.get((r, s), 0)}
                  for r, s in set(by_route) | set(server_side)
                  if by_route.get((r, s), 0) != server_side.get((r, s), 0)}
    server.send_signal(signal.SIGTERM)
    try:
        exit_code = server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        exit_code = "killed after 60 s"

    total = sum(seen.values())
    bad = sum(n for (name, _), n in seen.items() if next(c for c in all_cases if c.name == name).bad)
    mib = lambda b: None if b is None else round(b / 2**20, 1)
    report = {
        "duration_s": round(elapsed, 1), "clients": args.clients, "requests": total, "requests_per_s": round(total / elapsed, 1),
        "bad_input_share": round(bad / total, 3) if total else None,
        "statuses": dict(sorted(collections.Counter(s for (_, s) in seen.elements()).items(), key=str)),
        "by_case": {c.name: {str(s): n for (name, s), n in sorted(seen.items(), key=str) if name == c.name} for c in all_cases},
        "unexpected": {f"{n} -> {s}": k for (n, s), k in unexpected.items()},
        "rss_mib": {"start": mib(rss_start), "end": mib(rss_end), "peak": mib(peak),
                    "max_sampled": mib(max(rss_samples) if rss_samples else None), "budget": mib(budget),
                    # Medians over the first and the last tenth of the run: flat if nothing leaks.
                    "median_first_tenth": mib(median(rss_samples[: max(1, len(rss_samples) // 10)])),
                    "median_last_tenth": mib(median(rss_samples[-max(1, len(rss_samples) // 10):]))},
        "metrics_match_clients": not mismatches, "metrics_mismatches": mismatches,
        "server_alive_at_end": alive, "exit_code_after_sigterm": exit_code,
    }
    print(json.dumps(report, indent=2))
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    ok = alive and not unexpected and not mismatches and exit_code == 0 and (budget is None or peak is None or peak <= budget)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
