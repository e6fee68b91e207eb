"""ONNX Runtime's own per-node timings for a FasterNet variant, summed per stage and layer role.

Usage: .venv/bin/python tools/ort_profile.py --variant t2 --batch 4 --threads 1

Runs the ONNX export that tools/bench.py caches (.data/bench/fasternet_<variant>_<size>.onnx; run
bench.py with the onnxruntime engine once first) with the same session options as bench.py plus
`enable_profiling`, then prints ms per batch for each stage's merge (downsampling), partial
convolution (with its Split/Concat) and two 1x1 convolutions, and everything else ("-": the stem,
layout reorders between the partial convolutions' Split/Concat and the NCHWc convolutions, the
head). docs/benchmark-log.md compares these with the fast engine's stage timers.
"""
import argparse
import collections
import json
import os
import tempfile
import time

import numpy as np
import onnxruntime as ort

from bench import onnx_path, ort_session_options, stage_and_role


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="t2")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=30)
    a = ap.parse_args()
    model = onnx_path(a.variant, a.size)
    if not os.path.exists(model):
        raise SystemExit(f"{model} not found: run tools/bench.py --engines onnxruntime --variants {a.variant} first")
    so = ort_session_options(a.threads)
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = os.path.join(tmp, "ort")
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        feed = {"input": np.random.default_rng(0).standard_normal((a.batch, 3, a.size, a.size), dtype=np.float32)}
        for _ in range(5):
            sess.run(None, feed)
        start = time.perf_counter()
        for _ in range(a.runs):
            sess.run(None, feed)
        wall = (time.perf_counter() - start) / a.runs
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    per_node = collections.defaultdict(float)
    calls = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"]] += e["dur"] / 1e3
            calls[e["name"]] += 1
    runs = max(calls.values())
    parts = collections.defaultdict(float)
    for node, ms in per_node.items():
        parts[stage_and_role(node)] += ms / runs
    print(f"{a.variant} batch {a.batch}, {a.threads} thread(s): {wall * 1e3:.1f} ms per batch "
          f"({a.batch / wall:.1f} img/s, profiling on; {runs} profiled runs incl. warm-up)")
    for (stage, r), ms in sorted(parts.items()):
        print(f"  {stage:8s} {r:13s} {ms:7.2f} ms")
    print(f"  {'total':22s} {sum(parts.values()):7.2f} ms")


if __name__ == "__main__":
    main()
