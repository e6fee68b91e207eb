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
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--http", default="127.0.0.1:8080")
    p.add_argument("--grpc", default="127.0.0.1:8081")
    p.add_argument("--image", required=True)
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
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
    for clients in map(int, args.concurrency.split(",")):
        for round_ in range(1, args.rounds + 1):
            base = None
            for door, make in doors.items():
                rate, p50, p99, errors = run(make, clients, args.seconds)
                base = base or rate
                print(f"| {clients} | {round_} | {door} | {rate:.1f} | {p50:.1f} | {p99:.1f} | {errors} | {rate / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
