#!/usr/bin/env python3
"""Bounded load generator for fasternet-serve's POST /classify (Python stdlib only).

Sends a fixed number of requests with a fixed concurrency and a total time cap; never retries
(retries are the load balancer's job, which is what the CI measures). Every 200 answer is checked
against the API contract:

    {"model": str, "results": [{"filename": null, "predictions": [{"label": str,
     "class_index": int, "score": float}, ...]}]}

Images: --fashion-mnist N encodes the first N Fashion-MNIST test images (Debian package
dataset-fashion-mnist) as 28x28 greyscale PNGs, whose true classes also give a top-1 accuracy
(--min-accuracy); --images FILE... sends files as they are.

    python3 deploy/ci/loadgen.py --url http://127.0.0.1:8080 --fashion-mnist 50 \
        --requests 400 --concurrency 8 --max-seconds 120 --report /tmp/report.json
    python3 deploy/ci/loadgen.py --url unused --fashion-mnist 3 --save /tmp/fm   # just the PNGs

Exit status: 0 when failures <= --max-failures, every request was sent before the time cap and
the accuracy is at least --min-accuracy; 1 otherwise; 2 on bad arguments.
"""
import argparse
import gzip
import http.client
import json
import os
import struct
import sys
import threading
import time
import urllib.parse
import zlib

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                 ".webp": "image/webp", ".gif": "image/gif", ".bmp": "image/bmp"}


def png_grey(pixels, width, height):
    """Encodes 8-bit greyscale pixels (bytes, row-major) as a PNG."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + pixels[y * width:(y + 1) * width] for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def fashion_mnist(n, data_dir=FASHION_MNIST_DIR):
    """[(name, content_type, png_bytes, true_class)] for the first n test images."""
    with gzip.open(os.path.join(data_dir, "t10k-images-idx3-ubyte.gz"), "rb") as f:
        images = f.read()
    with gzip.open(os.path.join(data_dir, "t10k-labels-idx1-ubyte.gz"), "rb") as f:
        labels = f.read()
    count, rows, cols = struct.unpack(">III", images[4:16])
    n = min(n, count)
    out = []
    for i in range(n):
        px = images[16 + i * rows * cols: 16 + (i + 1) * rows * cols]
        out.append((f"fashion-mnist-{i:05d}.png", "image/png", png_grey(px, cols, rows), labels[8 + i]))
    return out


def check_response(body):
    """Returns (top1_class_index, error). error is None when the body follows the contract."""
    try:
        doc = json.loads(body)
    except ValueError as e:
        return None, f"not JSON: {e}"
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), str):
        return None, "no string 'model'"
    results = doc.get("results")
    if not isinstance(results, list) or len(results) != 1:
        return None, "'results' is not a list of one result"
    preds = results[0].get("predictions") if isinstance(results[0], dict) else None
    if not isinstance(preds, list) or not preds:
        return None, "no 'predictions'"
    for p in preds:
        if not (isinstance(p, dict) and isinstance(p.get("label"), str) and isinstance(p.get("class_index"), int)
                and isinstance(p.get("score"), (int, float)) and 0.0 <= p["score"] <= 1.0 + 1e-6):
            return None, f"bad prediction {p!r}"
    scores = [p["score"] for p in preds]
    if scores != sorted(scores, reverse=True):
        return None, "predictions not sorted by score"
    return preds[0]["class_index"], None


class Load:
    def __init__(self, args, images):
        u = urllib.parse.urlsplit(args.url)
        if u.scheme != "http" or not u.hostname:
            raise SystemExit(f"--url must be http://host:port, got {args.url}")
        self.host, self.port = u.hostname, u.port or 80
        self.path = (u.path.rstrip("/") or "") + "/classify"
        self.args, self.images = args, images
        self.lock = threading.Lock()
        self.next = 0
        self.done = 0
        self.ok = 0
        self.failures = []          # (request index, image, error)
        self.statuses = {}
        self.latencies = []
        self.correct = 0
        self.labelled = 0
        self.first_body = None
        self.deadline = time.monotonic() + args.max_seconds

    def take(self):
        with self.lock:
            if self.next >= self.args.requests or time.monotonic() > self.deadline:
                return None
            self.next += 1
            return self.next - 1

    def progress(self):
        if self.args.progress_file:
            tmp = self.args.progress_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{self.done}\n")
            os.replace(tmp, self.args.progress_file)

    def worker(self):
        conn = None
        while True:
            i = self.take()
            if i is None:
                break
            name, ctype, data, truth = self.images[i % len(self.images)]
            t0 = time.monotonic()
            status, err, top1 = None, None, None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=self.args.timeout)
                conn.request("POST", self.path, body=data, headers={"Content-Type": ctype})
                resp = conn.getresponse()
                body = resp.read()
                status = resp.status
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
                if status == 200:
                    top1, err = check_response(body)
                    if err is None and self.first_body is None:
                        self.first_body = body
                else:
                    err = f"HTTP {status}: {body[:200]!r}"
            except Exception as e:  # connection reset, timeout, ...
                err = f"{type(e).__name__}: {e}"
                if conn is not None:
                    conn.close()
                conn = None
            dt = time.monotonic() - t0
            with self.lock:
                self.done += 1
                key = str(status) if status is not None else "error"
                self.statuses[key] = self.statuses.get(key, 0) + 1
                if err is None:
                    self.ok += 1
                    self.latencies.append(dt)
                    if truth is not None:
                        self.labelled += 1
                        self.correct += int(top1 == truth)
                else:
                    self.failures.append((i, name, err))
                self.progress()
        if conn is not None:
            conn.close()

    def run(self):
        self.progress()
        t0 = time.monotonic()
        threads = [threading.Thread(target=self.worker, daemon=True) for _ in range(self.args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            # Workers stop taking work at the deadline; an in-flight request is bounded by --timeout.
            t.join(self.args.max_seconds + self.args.timeout + 5)
        return time.monotonic() - t0


def pct(xs, q):
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--fashion-mnist", type=int, default=0, metavar="N")
    ap.add_argument("--fashion-mnist-dir", default=FASHION_MNIST_DIR)
    ap.add_argument("--images", nargs="*", default=[])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=120.0, help="stop sending after this long")
    ap.add_argument("--timeout", type=float, default=30.0, help="per request")
    ap.add_argument("--max-failures", type=int, default=0)
    ap.add_argument("--min-accuracy", type=float, default=0.0, help="top-1 on labelled images")
    ap.add_argument("--progress-file", help="rewritten with the number of answered requests")
    ap.add_argument("--report", help="write the summary as JSON here")
    ap.add_argument("--label", default="load", help="name printed in the summary")
    ap.add_argument("--print-first", action="store_true", help="print the first valid response body")
    ap.add_argument("--save", metavar="DIR", help="only write the images to DIR (as NAME, true class in "
                    "DIR/classes.txt) and exit")
    args = ap.parse_args()

    images = []
    if args.fashion_mnist:
        images += fashion_mnist(args.fashion_mnist, args.fashion_mnist_dir)
    for path in args.images:
        ext = os.path.splitext(path)[1].lower()
        with open(path, "rb") as f:
            images.append((os.path.basename(path), CONTENT_TYPES.get(ext, "application/octet-stream"), f.read(), None))
    if not images:
        ap.error("no images: give --fashion-mnist N and/or --images FILE...")
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        with open(os.path.join(args.save, "classes.txt"), "w") as f:
            for name, _, data, truth in images:
                with open(os.path.join(args.save, name), "wb") as img:
                    img.write(data)
                f.write(f"{name} {'' if truth is None else truth}\n")
        return 0

    load = Load(args, images)
    wall = load.run()
    unsent = args.requests - load.next
    lat = load.latencies
    summary = {
        "label": args.label, "requests": args.requests, "sent": load.next, "answered": load.done,
        "ok": load.ok, "failed": len(load.failures), "unsent": unsent, "statuses": load.statuses,
        "seconds": round(wall, 3), "rps": round(load.done / wall, 1) if wall > 0 else 0.0,
        "latency_ms": {"p50": round(pct(lat, 0.5) * 1e3, 1), "p95": round(pct(lat, 0.95) * 1e3, 1),
                       "max": round(max(lat, default=0.0) * 1e3, 1)},
        "accuracy": round(load.correct / load.labelled, 4) if load.labelled else None,
        "failures": [{"request": i, "image": n, "error": e} for i, n, e in load.failures[:20]],
    }
    if args.report:
        with open(args.report, "w") as f:
            json.dump(summary, f, indent=1)
    if args.print_first and load.first_body is not None:
        print(load.first_body.decode(errors="replace"))
    print(f"[{args.label}] {load.done}/{args.requests} answered in {wall:.1f}s ({summary['rps']} req/s): "
          f"ok={load.ok} failed={len(load.failures)} unsent={unsent} statuses={load.statuses} "
          f"latency p50={summary['latency_ms']['p50']}ms p95={summary['latency_ms']['p95']}ms "
          f"max={summary['latency_ms']['max']}ms"
          + (f" top1={summary['accuracy']:.3f}" if summary["accuracy"] is not None else ""))
    for i, n, e in load.failures[:10]:
        print(f"[{args.label}]   request {i} ({n}): {e}")
    bad = []
    if len(load.failures) > args.max_failures:
        bad.append(f"{len(load.failures)} failed requests (allowed: {args.max_failures})")
    if unsent:
        bad.append(f"{unsent} requests not sent within {args.max_seconds}s")
    if summary["accuracy"] is not None and summary["accuracy"] < args.min_accuracy:
        bad.append(f"top-1 {summary['accuracy']:.3f} < {args.min_accuracy}")
    for b in bad:
        print(f"[{args.label}] FAIL: {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
