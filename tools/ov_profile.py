"""OpenVINO's own per-layer timings (PERF_COUNT) for a FasterNet variant, summed per layer type.

Usage: .venv/bin/python tools/ov_profile.py --variant t2 --batch 4 --threads 1 [--precision bf16]
           [--by node_type|exec_type|stage] [--top 15]

Compiles the ONNX export that tools/bench.py caches (.data/bench/fasternet_<variant>_<size>.onnx;
run bench.py with an onnxruntime or openvino engine once first) with the same settings as
bench.py's `openvino` engine (static batch, LATENCY hint, one stream, `--threads` inference
threads, INFERENCE_PRECISION_HINT f32, or bf16 with `--precision bf16`) plus profiling
(`ov.properties.enable_profiling()`), then sums each executed node's real time from
`request.profiling_info` over `--runs` inferences and prints ms per batch for the top entries
by node type after OpenVINO's fusions (default), by the kernel that ran them (`--by exec_type`,
e.g. brgconv_avx512_1x1_f32, or ..._amx_... in bf16 on CPUs with AMX), or by stage and layer
role (`--by stage`: the same split as tools/ort_profile.py's, ONNX Runtime's view of the same
graph).
"""
import argparse
import collections
import os
import time

import numpy as np
import openvino as ov

from bench import onnx_path, ov_bf16_supported, ov_compiled_model, stage_and_role


def key(info, by):
    if by == "node_type":
        return info.node_type
    if by == "exec_type":
        return f"{info.node_type} {info.exec_type}"
    stage, role = stage_and_role(info.node_name)
    return f"{stage:8s} {role}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="t2")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--by", choices=["node_type", "exec_type", "stage"], default="node_type")
    ap.add_argument("--top", type=int, default=15, help="entries to print (0: all)")
    a = ap.parse_args()
    model = onnx_path(a.variant, a.size)
    if not os.path.exists(model):
        raise SystemExit(f"{model} not found: run tools/bench.py --engines openvino --variants {a.variant} first")
    core = ov.Core()
    if a.precision == "bf16" and not ov_bf16_supported(core):
        raise SystemExit("this CPU has no bf16 support in OpenVINO (BF16 not in the CPU plugin's "
                         "OPTIMIZATION_CAPABILITIES)")
    request = ov_compiled_model(core, a.variant, a.size, a.batch, a.threads, a.precision,
                                profiling=True).create_infer_request()
    request.set_input_tensor(ov.Tensor(np.random.default_rng(0).standard_normal(
        (a.batch, 3, a.size, a.size), dtype=np.float32)))
    for _ in range(5):
        request.infer()
    per_key, nodes = collections.defaultdict(float), collections.defaultdict(set)
    wall = 0.0
    for _ in range(a.runs):
        start = time.perf_counter()
        request.infer()
        wall += time.perf_counter() - start
        # profiling_info describes the last inference only: read it after each one.
        for info in request.profiling_info:
            if info.status == ov.ProfilingInfo.Status.EXECUTED:
                k = key(info, a.by)
                per_key[k] += info.real_time.total_seconds() * 1e3 / a.runs
                nodes[k].add(info.node_name)
    wall /= a.runs
    total = sum(per_key.values())
    ranked = sorted(per_key.items(), key=lambda kv: -kv[1]) if a.by != "stage" else sorted(per_key.items())
    shown = ranked[:a.top] if a.top and a.by != "stage" else ranked
    print(f"OpenVINO {ov.get_version()} {a.precision}: {a.variant} batch {a.batch}, {a.threads} thread(s): "
          f"{wall * 1e3:.1f} ms per batch ({a.batch / wall:.1f} img/s, profiling on; {a.runs} runs "
          f"after 5 warm-up)")
    width = max(len(k) for k, _ in shown)
    print(f"  {'by ' + a.by:{width}s}  {'ms':>7s}  {'share':>6s}  nodes")
    for k, ms in shown:
        print(f"  {k:{width}s}  {ms:7.2f}  {ms / total:6.1%}  {len(nodes[k]):5d}")
    if len(shown) < len(ranked):
        rest = sum(ms for _, ms in ranked[len(shown):])
        print(f"  {'(' + str(len(ranked) - len(shown)) + ' more)':{width}s}  {rest:7.2f}  {rest / total:6.1%}")
    print(f"  {'total':{width}s}  {total:7.2f}")


if __name__ == "__main__":
    main()
