#!/usr/bin/env python3
"""Closed-loop load on the three front doors of one running fasternet-serve, interleaved per
level: /classify (plain HTTP), the v2 REST route (tritonclient.http, binary data) and v2 gRPC
(tritonclient.grpc). Every door sends the same image and asks for the top 5 classes; every
client is a Python thread with its own connection, so the clients cost the same on each door
and the ratios compare the doors, not the clients.

    fasternet-serve serve --port 8080 --grpc-port 8081 &
    pip install 'tritonclient[http,grpc]' numpy
    tools/v2_load.py --http 127.0.0.1:8080 --grpc 127.0.0.1:8081 --image tests/fixtures/fashion_mnist_t10k_0.png

Prints requests/s, p50 and p99 (ms) and errors per door and level, and each v2 door's
requests/s as a ratio to /classify's in the same level and round.

    tools/v2_load.py ... --json FILE.json --plot FILE.png
    tools/v2_load.py --plot-from FILE.json [--plot FILE.png]

`--json` also saves every row (and the machine) for a later `--plot-from`; `--plot` draws
requests/s and p99 latency against clients, one line per door, the median over rounds with
min-max error bars (tools/plots.py, needs matplotlib); `--plot-from` measures nothing and
draws a saved run (to --plot, default FILE.png).
"""
import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

from bench import cpu_model  # this directory's, beside this script


def classify_door(args, image):
    host, port = args.http.split(":")
    connection = http.client.HTTPConnection(host, int(port))
    def call():
        connection.request("POST", "/classify?top_k=5", body=image, headers={"content-type": "application/octet-stream"})
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(response.status)
    return call


def triton_door(module, address, model, image):
    client = module.InferenceServerClient(address)
    tensor = module.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    outputs = [module.InferRequestedOutput("probabilities", class_count=5)]
    return lambda: client.infer(model, [tensor], outputs=outputs)


def run(make_call, clients, seconds):
    """Closed loop: each client calls again as soon as it is answered."""
    latencies, errors, stop = [], [0], time.monotonic() + seconds
    lock = threading.Lock()
    calls = [make_call() for _ in range(clients)]
    def loop(call):
        mine = []
        while time.monotonic() < stop:
            start = time.monotonic()
            try:
                call()
                mine.append(time.monotonic() - start)
            except Exception:
                with lock:
                    errors[0] += 1
        with lock:
            latencies.extend(mine)
    threads = [threading.Thread(target=loop, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 if latencies else float("nan")
    return len(latencies) / seconds, pick(0.5), pick(0.99), errors[0]


def chart(source, out):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        from plots import chart_from_file
    except ImportError as err:
        sys.exit(f"cannot plot: {err} (pip install -r tools/requirements.txt)")
    print(f"chart written to {chart_from_file(source, out)}", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--http", default="127.0.0.1:8080")
    p.add_argument("--grpc", default="127.0.0.1:8081")
    p.add_argument("--image")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", metavar="FILE", help="also save the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also chart requests/s and p99 against clients")
    p.add_argument("--plot-from", metavar="FILE.json", help="measure nothing: chart a saved --json run")
    args = p.parse_args()
    if args.plot_from:
        return chart(args.plot_from, args.plot)
    if not args.image:
        p.error("--image is required (unless --plot-from)")
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (fail before measuring, not after)
        except ImportError as err:
            p.error(f"--plot needs matplotlib: {err}")
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    image = open(args.image, "rb").read()
    model = json.load(urllib.request.urlopen(f"http://{args.http}/v1/models"))["models"][0]["name"]
    doors = {
        "/classify": lambda: classify_door(args, image),
        "v2 REST": lambda: triton_door(httpclient, args.http, model, image),
        "v2 gRPC": lambda: triton_door(grpcclient, args.grpc, model, image),
    }
    print(f"model {model}, image {args.image} ({len(image)} bytes), {args.seconds:g} s per run, {args.rounds} rounds")
    print("| clients | round | door | requests/s | p50 ms | p99 ms | errors | / classify |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    rows = []
    for clients in map(int, args.concurrency.split(",")):
        for round_ in range(1, args.rounds + 1):
            base = None
            for door, make in doors.items():
                rate, p50, p99, errors = run(make, clients, args.seconds)
                base = base or rate
                print(f"| {clients} | {round_} | {door} | {rate:.1f} | {p50:.1f} | {p99:.1f} | {errors} | {rate / base:.2f} |", flush=True)
                rows.append({"group": f"model {model}", "series": door, "clients": clients, "round": round_,
                             "requests_per_s": rate, "p50_ms": p50, "p99_ms": p99, "errors": errors,
                             "vs_classify": rate / base if base else None})
    if args.json or args.plot:
        date = time.strftime("%Y-%m-%d %H:%M %Z")
        data = {"kind": "load", "tool": "tools/v2_load.py", "meta": {
            "cpu": cpu_model(), "cpus": os.cpu_count(), "model": model, "http": args.http, "grpc": args.grpc,
            "image": os.path.basename(args.image), "image_bytes": len(image), "seconds": args.seconds,
            "rounds": args.rounds, "date": date, "rate_label": "requests/s",
            "subtitle": f"/classify, v2 REST, v2 gRPC; {os.path.basename(args.image)} ({len(image)} bytes), top 5; "
                        f"{args.seconds:g} s per run, median of {args.rounds} rounds (error bars min-max); "
                        f"Python clients on the same machine; {date}"},
            "groups": [{"name": f"model {model}"}], "rows": rows}
        with tempfile.TemporaryDirectory() as tmp:
            path = args.json or os.path.join(tmp, "results.json")
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
            if args.json:
                print(f"results saved to {path}", file=sys.stderr)
            if args.plot:
                chart(path, args.plot)


if __name__ == "__main__":
    main()
