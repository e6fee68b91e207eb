"""CPU throughput benchmark of FasterNet: candle (Rust) vs PyTorch eager vs ONNX Runtime.

Usage (from the repository root):

    .venv/bin/python tools/bench.py [--variants t0,t1,t2] [--size 224] [--batch 1,8,32]
        [--threads 2] [--rounds 3] [--seconds 5] [--engines candle,pytorch,onnxruntime]
        [--channels-last] [--binary target/release/fasternet-serve]
        [--rust-engine-flag NAME] [--markdown]

Engines: `candle` (the Rust binary's `bench` subcommand; `candle:NAME` passes `--engine NAME`,
as does `--rust-engine-flag NAME` for a plain `candle`), `pytorch` (timm, fp32 NCHW, eval,
inference_mode), `pytorch-cl` (same, channels_last; added by `--channels-last`) and
`onnxruntime` (the timm model exported to ONNX opset 17, cached under .data/bench/).
All models have random weights: only speed is measured.

This machine's speed drifts (up to 2x over minutes), so the engines are interleaved: every round
measures each engine once (A B C A B C ...), each in its own subprocess so thread pools do not
interfere, and the table reports the median over rounds with the min-max spread. Ratios are
medians divided by the PyTorch / ONNX Runtime medians for the same variant and batch size.

Internal: `bench.py --worker ENGINE --variants t0 --size 224 --batch 1,8 --threads 2 --seconds 5`
measures one engine in-process and prints one JSON line {"batch": images_per_second, ...};
`--worker export` writes the cached ONNX file(s).
"""
import argparse
import importlib.metadata
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.path.join(ROOT, ".data", "bench")
# Output contract of `fasternet-serve bench`, e.g. "t0 224x224 batch 8: 201.3 img/s (39.7 ms/batch)".
CANDLE_LINE = re.compile(r"^(\w+) (\d+)x(\d+) batch (\d+): ([0-9.]+) img/s")


def onnx_path(variant, size):
    return os.path.join(CACHE_DIR, f"fasternet_{variant}_{size}.onnx")


def ort_session_options(threads):
    """ONNX Runtime's session options for a measurement: `threads` intra-op threads, one
    inter-op thread, every graph optimisation."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def worker_env(threads):
    env = dict(os.environ)
    # OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set in this machine's environment and slow
    # numpy/torch down here; the workers run without them.
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("OPENBLAS_L2_SIZE", None)
    env["OMP_NUM_THREADS"] = str(threads)
    return env


# ---------------------------------------------------------------- worker side (in-process)

def timm_model(variant, channels_last=False):
    import timm
    import torch
    torch.manual_seed(0)
    model = timm.create_model(f"fasternet_{variant}", pretrained=False).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def time_loop(step, batch, seconds):
    """Warm-up (>= 2 calls and >= 0.5 s), then call step() for `seconds`; returns images/s."""
    t0, n = time.perf_counter(), 0
    while n < 2 or time.perf_counter() - t0 < 0.5:
        step()
        n += 1
    t0, n = time.perf_counter(), 0
    while True:
        step()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n * batch / dt


def export_onnx(variant, size):
    import torch
    path = onnx_path(variant, size)
    if os.path.exists(path):
        return
    os.makedirs(CACHE_DIR, exist_ok=True)
    tmp = path + ".tmp"
    # dynamo=False: the TorchScript exporter (the dynamo one needs onnxscript, not installed).
    torch.onnx.export(timm_model(variant), torch.randn(1, 3, size, size), tmp, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    os.replace(tmp, path)


def run_worker(a):
    variant, batches = a.variants[0], a.batch
    if a.worker == "export":
        for v in a.variants:
            export_onnx(v, a.size)
        return
    if a.worker in ("pytorch", "pytorch-cl"):
        import torch
        torch.set_num_threads(a.threads)
        torch.set_num_interop_threads(1)
        cl = a.worker == "pytorch-cl"
        model = timm_model(variant, cl)

        def make_step(b):
            x = torch.randn(b, 3, a.size, a.size)
            x = x.to(memory_format=torch.channels_last) if cl else x

            def step():
                with torch.inference_mode():
                    model(x)
            return step
    elif a.worker == "onnxruntime":
        import numpy as np
        import onnxruntime as ort
        sess = ort.InferenceSession(onnx_path(variant, a.size), ort_session_options(a.threads),
                                    providers=["CPUExecutionProvider"])

        def make_step(b):
            feed = {"input": np.random.default_rng(0).standard_normal(
                (b, 3, a.size, a.size), dtype=np.float32)}
            return lambda: sess.run(None, feed)
    else:
        sys.exit(f"unknown worker engine {a.worker!r}")
    print(json.dumps({b: time_loop(make_step(b), b, a.seconds) for b in batches}), flush=True)


# ---------------------------------------------------------------- driver side (subprocesses)

def measure(engine, variant, a):
    """One measurement of `engine` for all batch sizes; returns {batch: img/s}, raises on failure."""
    common = ["--size", str(a.size), "--batch", ",".join(map(str, a.batch)),
              "--threads", str(a.threads), "--seconds", f"{a.seconds:g}"]
    if engine.split(":")[0] == "candle":
        flag = engine.partition(":")[2] or a.rust_engine_flag
        cmd = [a.binary, "bench", "--variant", variant, *common] + (["--engine", flag] if flag else [])
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--variants", variant, *common]
    p = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(a.threads), cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    if not engine.startswith("candle"):
        line = [l for l in p.stdout.splitlines() if l.startswith("{")][-1]
        return {int(b): v for b, v in json.loads(line).items()}
    out = {}
    for line in p.stdout.splitlines():
        m = CANDLE_LINE.match(line.strip())
        if m and m[1] == variant and int(m[2]) == a.size:
            out[int(m[4])] = float(m[5])
    if not out:
        raise RuntimeError(f"no '<variant> <size>x<size> batch N: X img/s' line in output of "
                           f"{' '.join(cmd)}:\n{p.stdout[-2000:]}")
    return out


def cpu_busy(interval=1.0):
    """Fraction of all CPU time that was not idle/iowait over `interval` seconds (/proc/stat)."""
    def sample():
        with open("/proc/stat") as f:
            t = [int(x) for x in f.readline().split()[1:]]
        return sum(t), t[3] + t[4]
    (t0, i0), _, (t1, i1) = sample(), time.sleep(interval), sample()
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def machine_line(a):
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass

    def ver(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "n/a"
    return (f"Machine: {cpu}, {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} usable); "
            f"{a.threads} threads; fp32, {a.size}x{a.size}; median (min-max) of {a.rounds} rounds x "
            f"{a.seconds:g} s; torch {ver('torch')}, onnxruntime {ver('onnxruntime')}, timm {ver('timm')}.")


def report(results, engines, a):
    """results[(engine, variant, batch)] = [img/s per round]."""
    header = ["variant", "batch", "engine", "img/s", "min-max", "vs pytorch", "vs onnxruntime"]
    rows = []
    for v in a.variants:
        for b in a.batch:
            med = {e: statistics.median(results[e, v, b]) for e in engines if results.get((e, v, b))}

            def ratio(base):
                return (lambda e: f"{med[e] / med[base]:.2f}x") if base in med else (lambda e: "-")
            for e in engines:
                if e in med:
                    r = results[e, v, b]
                    rows.append([v, str(b), e, f"{med[e]:.1f}", f"{min(r):.1f}-{max(r):.1f}",
                                 ratio("pytorch")(e), ratio("onnxruntime")(e)])
    if a.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---"] * 3 + ["---:"] * 4) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        print("\n" + machine_line(a))
    else:
        w = [max(len(x) for x in col) for col in zip(header, *rows)]
        for r in [header] + rows:
            print("  ".join(x.ljust(n) if i < 3 else x.rjust(n) for i, (x, n) in enumerate(zip(r, w))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    csv = lambda s: [x for x in s.split(",") if x]
    ap.add_argument("--variants", type=csv, default=["t0"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=lambda s: [int(x) for x in csv(s)], default=[1, 8, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--engines", type=csv, default=["candle", "pytorch", "onnxruntime"])
    ap.add_argument("--channels-last", action="store_true", help="also measure pytorch-cl")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "fasternet-serve"))
    ap.add_argument("--rust-engine-flag", metavar="NAME", help="pass --engine NAME to the binary")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return run_worker(a)

    engines = a.engines + (["pytorch-cl"] if a.channels_last and "pytorch-cl" not in a.engines else [])
    if any(e.startswith("candle") for e in engines) and not os.access(a.binary, os.X_OK):
        print(f"skipping candle: {a.binary} not found or not executable (cargo build --release)",
              file=sys.stderr)
        engines = [e for e in engines if not e.startswith("candle")]
    if "onnxruntime" in engines:
        print("exporting ONNX models (cached in .data/bench/) ...", file=sys.stderr)
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "export",
                            "--variants", ",".join(a.variants), "--size", str(a.size)],
                           capture_output=True, text=True, env=worker_env(a.threads), cwd=ROOT)
        if p.returncode != 0:
            print(f"skipping onnxruntime: export failed:\n{p.stderr.strip()[-2000:]}", file=sys.stderr)
            engines.remove("onnxruntime")

    busy = cpu_busy()
    if busy > 0.15:  # other CPU users (a cargo build...) make OpenMP/rayon thread barriers collapse
        print(f"warning: CPUs already {busy:.0%} busy before the benchmark; results will be noisy",
              file=sys.stderr)
    results, failed = {}, set()
    for rnd in range(1, a.rounds + 1):
        for v in a.variants:
            for e in engines:
                if (e, v) in failed:
                    continue
                try:
                    ips = measure(e, v, a)
                except Exception as err:  # a missing/broken engine is skipped, not fatal
                    print(f"skipping {e} {v}: {err}", file=sys.stderr)
                    failed.add((e, v))
                    continue
                for b, x in ips.items():
                    results.setdefault((e, v, b), []).append(x)
                print(f"round {rnd}/{a.rounds} {v} {e}: " +
                      ", ".join(f"b{b} {x:.1f}" for b, x in sorted(ips.items())) + " img/s",
                      file=sys.stderr, flush=True)
    if not results:
        sys.exit("no engine produced results")
    report(results, engines, a)


if __name__ == "__main__":
    main()
