"""CPU throughput benchmark of FasterNet: candle (Rust) vs PyTorch eager vs ONNX Runtime vs OpenVINO.

Usage (from the repository root):

    .venv/bin/python tools/bench.py [--variants t0,t1,t2] [--size 224] [--batch 1,8,32]
        [--threads 2] [--rounds 3] [--seconds 5] [--engines candle,pytorch,onnxruntime]
        [--channels-last] [--binary target/release/fasternet-serve]
        [--rust-engine-flag NAME] [--ratio-against ENGINES] [--markdown]
        [--json FILE.json] [--plot FILE.png]
    .venv/bin/python tools/bench.py --plot-from FILE.json [--plot FILE.png] [--ratio-against ENGINES] [--markdown]

Engines: `candle` (the Rust binary's `bench` subcommand; `candle:NAME` passes `--engine NAME`,
as does `--rust-engine-flag NAME` for a plain `candle`), `pytorch` (timm, fp32 NCHW, eval,
inference_mode), `pytorch-cl` (same, channels_last; added by `--channels-last`),
`onnxruntime` (the timm model exported to ONNX opset 17, cached under .data/bench/), and
`openvino` / `openvino-bf16` (the same ONNX file on OpenVINO's CPU plugin, reshaped to each
batch size statically, with the LATENCY performance hint, one stream, `--threads` inference
threads and INFERENCE_PRECISION_HINT pinned to f32 or bf16; `openvino-bf16` is skipped on CPUs
whose OPTIMIZATION_CAPABILITIES lack BF16), and `openvino-streams` / `openvino-bf16-streams`
(OpenVINO's own way to fill several cores with a batch: the THROUGHPUT hint, one stream of one
thread per `--threads`, each batch split into that many requests of batch / threads images run
at once; only batch sizes that are multiples of the thread count), and two int8 peers:
`openvino-int8` (the ONNX file quantised by NNCF's post-training quantisation, `nncf.quantize`
with its defaults: int8 weights per output channel, activations per tensor; compiled as
`openvino`, its layers left in floating point in bf16 where the CPU has it, else f32) and
`onnxruntime-int8` (ONNX Runtime's static quantisation, `quantize_static`: QDQ format, int8
weights per channel, uint8 activations, MinMax calibration); both calibrated on the same 100
standard-normal images and cached under .data/bench/. All models have random weights: only
speed is measured. tools/ov_profile.py prints OpenVINO's per-layer profile of
one variant and batch.

This machine's speed drifts (up to 2x over minutes), so the engines are interleaved: every round
measures each engine once (A B C A B C ...), each in its own subprocess so thread pools do not
interfere, and the table reports the median over rounds with the min-max spread. The ratio
columns are medians divided by the median of one reference engine for the same variant and
batch size: by default one column for each of pytorch, onnxruntime, openvino and openvino-bf16
that is in the run (so `vs openvino` is fp32 against OpenVINO fp32, `vs openvino-bf16` a bf16
engine against OpenVINO bf16); `--ratio-against LIST` picks the columns (any engine names).

`--json FILE` saves the raw per-round results and the machine description; `--plot FILE.png`
draws a grouped bar chart (images/s by batch size and engine, one panel per variant, min-max
error bars; needs matplotlib); `--plot-from FILE.json` prints the table and, with `--plot`,
redraws the chart from a saved run without measuring.

Internal: `bench.py --worker ENGINE --variants t0 --size 224 --batch 1,8 --threads 2 --seconds 5`
measures one engine in-process and prints one JSON line {"batch": images_per_second, ...};
`--worker export` writes the cached ONNX file(s), `--worker quantize --engines ENGINE` an int8
peer's quantised model(s); `--worker openvino-caps` prints OpenVINO's version and the CPU
plugin's OPTIMIZATION_CAPABILITIES as one JSON line.
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
# Engines that run the cached ONNX export, OpenVINO's with their inference precision, and the
# engines that get a ratio column by default (when they are in the run), in column order.
ONNX_ENGINES = ("onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16",
                "openvino-streams", "openvino-bf16-streams", "openvino-int8")
OPENVINO_PRECISION = {"openvino": "f32", "openvino-bf16": "bf16", "openvino-streams": "f32",
                      "openvino-bf16-streams": "bf16", "openvino-int8": "int8"}
INT8_ENGINES = ("onnxruntime-int8", "openvino-int8")
REFERENCE_ENGINES = ("pytorch", "onnxruntime", "openvino", "openvino-bf16", "openvino-streams",
                     "openvino-bf16-streams", "openvino-int8", "onnxruntime-int8")
# The int8 peers' calibration images: standard normal, seed 0 (the weights are random too).
CALIBRATION_IMAGES = 100


def onnx_path(variant, size):
    return os.path.join(CACHE_DIR, f"fasternet_{variant}_{size}.onnx")


def int8_path(engine, variant, size):
    """An int8 peer's cached quantised model: ONNX for ONNX Runtime, OpenVINO's IR (.xml, its
    weights in the .bin beside it) for OpenVINO."""
    ext = "xml" if engine == "openvino-int8" else "onnx"
    return os.path.join(CACHE_DIR, f"fasternet_{variant}_{size}_int8.{ext}")


def ort_session_options(threads):
    """ONNX Runtime's session options for a measurement: `threads` intra-op threads, one
    inter-op thread, every graph optimisation."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def ov_compiled_model(core, variant, size, batch, threads, precision, profiling=False,
                      streams=False):
    """The cached ONNX export compiled by OpenVINO's CPU plugin for one static batch size: LATENCY
    performance hint, one stream, `threads` inference threads (with `streams`: the THROUGHPUT
    hint, `threads` streams of one thread each), inference precision pinned to `precision`
    ("f32" or "bf16"; the plugin would otherwise pick bf16 by itself on CPUs with AMX; "int8":
    the NNCF-quantised model, its floating-point layers in bf16 where the CPU has it, else f32),
    per-node profiling when `profiling`. Raises if the plugin did not take the precision or,
    with `streams`, the streams."""
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints
    if precision == "int8":
        model = core.read_model(int8_path("openvino-int8", variant, size))
        precision = "bf16" if ov_bf16_supported(core) else "f32"
    else:
        model = core.read_model(onnx_path(variant, size))
    want = {"f32": ov.Type.f32, "bf16": ov.Type.bf16}[precision]
    model.reshape({0: [batch, 3, size, size]})
    mode = hints.PerformanceMode.THROUGHPUT if streams else hints.PerformanceMode.LATENCY
    config = {hints.performance_mode: mode, props.streams.num: threads if streams else 1,
              props.inference_num_threads: threads, hints.inference_precision: want}
    if profiling:
        config[props.enable_profiling] = True
    compiled = core.compile_model(model, "CPU", config)
    got = compiled.get_property(hints.inference_precision)
    if got != want:
        raise RuntimeError(f"OpenVINO compiled {variant} with inference precision {got}, not {want}")
    if streams and compiled.get_property(props.streams.num) != threads:
        raise RuntimeError(f"OpenVINO compiled {variant} with "
                           f"{compiled.get_property(props.streams.num)} streams, not {threads}")
    return compiled


def ov_bf16_supported(core):
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


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


def calibration_images(size):
    import numpy as np
    rng = np.random.default_rng(0)
    return [rng.standard_normal((1, 3, size, size), dtype=np.float32)
            for _ in range(CALIBRATION_IMAGES)]


def quantize(engine, variant, size):
    """Writes an int8 peer's quantised model (`int8_path`) from the cached ONNX export, once."""
    path = int8_path(engine, variant, size)
    if os.path.exists(path):
        return
    if engine == "openvino-int8":
        import nncf
        import openvino as ov
        model = ov.Core().read_model(onnx_path(variant, size))
        model.reshape({0: [1, 3, size, size]})
        quantized = nncf.quantize(model, nncf.Dataset(calibration_images(size)),
                                  subset_size=CALIBRATION_IMAGES)
        # The .xml last: its presence says the pair is complete.
        tmp = path[:-len(".xml")] + ".tmp.xml"
        ov.save_model(quantized, tmp)
        os.replace(tmp[:-len(".xml")] + ".bin", path[:-len(".xml")] + ".bin")
        os.replace(tmp, path)
        return
    from onnxruntime import quantization as q

    class Images(q.CalibrationDataReader):
        def __init__(self):
            self.feeds = ({"input": x} for x in calibration_images(size))

        def get_next(self):
            return next(self.feeds, None)

    prepared, tmp = path + ".prepared", path + ".tmp"
    q.quant_pre_process(onnx_path(variant, size), prepared)
    # u8 activations x s8 weights: the operand types of VNNI's vpdpbusd.
    q.quantize_static(prepared, tmp, Images(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                      calibrate_method=q.CalibrationMethod.MinMax)
    os.remove(prepared)
    os.replace(tmp, path)


def run_worker(a):
    variant, batches = a.variants[0], a.batch
    if a.worker == "export":
        for v in a.variants:
            export_onnx(v, a.size)
        return
    if a.worker == "quantize":
        for v in a.variants:
            quantize(a.engines[0], v, a.size)
        return
    if a.worker == "openvino-caps":
        import openvino as ov
        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        print(json.dumps({"version": ov.get_version(), "capabilities": list(caps)}), flush=True)
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
    elif a.worker in ("onnxruntime", "onnxruntime-int8"):
        import numpy as np
        import onnxruntime as ort
        path = (int8_path(a.worker, variant, a.size) if a.worker in INT8_ENGINES
                else onnx_path(variant, a.size))
        sess = ort.InferenceSession(path, ort_session_options(a.threads),
                                    providers=["CPUExecutionProvider"])

        def make_step(b):
            feed = {"input": np.random.default_rng(0).standard_normal(
                (b, 3, a.size, a.size), dtype=np.float32)}
            return lambda: sess.run(None, feed)
    elif a.worker in OPENVINO_PRECISION:
        import numpy as np
        import openvino as ov
        core = ov.Core()
        precision = OPENVINO_PRECISION[a.worker]
        if precision == "bf16" and not ov_bf16_supported(core):
            sys.exit("this CPU has no bf16 support in OpenVINO (OPTIMIZATION_CAPABILITIES: "
                     + ", ".join(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")) + ")")

        streams = a.worker.endswith("-streams")
        # With streams, a batch is `threads` requests of batch / threads images at once.
        parts = a.threads if streams else 1
        batches = [b for b in batches if b % parts == 0]
        if not batches:
            sys.exit(f"{a.worker} needs a batch size that is a multiple of --threads ({parts})")

        def make_step(b):
            # Compiled per batch size (static shapes), outside the timed loop; each request's
            # input tensor is set once, as ONNX Runtime reads the same numpy buffer on every call.
            compiled = ov_compiled_model(core, variant, a.size, b // parts, a.threads, precision,
                                         streams=streams)
            x = ov.Tensor(np.random.default_rng(0).standard_normal(
                (b // parts, 3, a.size, a.size), dtype=np.float32))
            if not streams:
                request = compiled.create_infer_request()
                request.set_input_tensor(x)
                return request.infer
            queue = ov.AsyncInferQueue(compiled, parts)
            for request in queue:
                request.set_input_tensor(x)

            def step():
                for _ in range(parts):
                    queue.start_async()
                queue.wait_all()
            return step
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


def layer_role(node):
    """The layer role of an ONNX node name, for the profilers (tools/ort_profile.py and
    tools/ov_profile.py; OpenVINO keeps the name of the first node of a fused group)."""
    if "spatial_mixing" in node:
        return "partial conv"
    # timm's mlp is (conv, BN, act, conv): the export folds the BN, ORT fuses the activation
    # into the first conv (its output is then named after mlp.2) and the residual into mlp.3.
    if "mlp.0" in node or "mlp.1" in node or "mlp.2" in node:
        return "fc1 + act"
    if "mlp.3" in node:
        return "fc2 + add"
    if "downsample" in node:
        return "merge"
    return "other"  # layout reorders within a stage


def stage_and_role(node):
    """("stage N", layer role) of an ONNX node name; "-" for the stem and the head."""
    stage = re.search(r"stages\.(\d+)", node)
    return (f"stage {int(stage.group(1)) + 1}" if stage else "-", layer_role(node))


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def package_version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "n/a"


def machine(a, engines):
    """The run's setting: the table's last line and the chart's title; saved by --json."""
    versions = {pkg: package_version(pkg) for pkg in ("torch", "onnxruntime", "timm")}
    if any(e in OPENVINO_PRECISION for e in engines):
        versions["openvino"] = package_version("openvino")
    if "openvino-int8" in engines:
        versions["nncf"] = package_version("nncf")
    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)), "threads": a.threads, "size": a.size,
            "rounds": a.rounds, "seconds": a.seconds, "versions": versions,
            "bf16": any("bf16" in e for e in engines + [a.rust_engine_flag or ""]),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "command": " ".join(["tools/bench.py"] + sys.argv[1:])}


def machine_line(m):
    precision = "fp32 (bf16 where named)" if m.get("bf16") else "fp32"
    versions = ", ".join(f"{pkg} {v}" for pkg, v in m["versions"].items())
    return (f"Machine: {m['cpu']}, {m['logical_cores']} logical cores ({m['usable_cores']} usable); "
            f"{m['threads']} threads; {precision}, {m['size']}x{m['size']}; median (min-max) of "
            f"{m['rounds']} rounds x {m['seconds']:g} s; {versions}.")


def ratio_bases(engines, requested):
    """The engines that get a `vs ENGINE` column: `--ratio-against`, else every reference engine
    in the run (pytorch, onnxruntime, openvino, openvino-bf16 and their -streams, in that
    order)."""
    return requested if requested is not None else [e for e in REFERENCE_ENGINES if e in engines]


def report(results, engines, variants, batches, bases, meta, markdown):
    """results[(engine, variant, batch)] = [img/s per round]."""
    header = ["variant", "batch", "engine", "img/s", "min-max"] + [f"vs {base}" for base in bases]
    rows = []
    for v in variants:
        for b in batches:
            med = {e: statistics.median(results[e, v, b]) for e in engines if results.get((e, v, b))}
            for e in engines:
                if e in med:
                    r = results[e, v, b]
                    rows.append([v, str(b), e, f"{med[e]:.1f}", f"{min(r):.1f}-{max(r):.1f}"] +
                                [f"{med[e] / med[base]:.2f}x" if base in med else "-" for base in bases])
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        print("\n" + machine_line(meta))
    else:
        w = [max(len(x) for x in col) for col in zip(header, *rows)]
        for r in [header] + rows:
            print("  ".join(x.ljust(n) if i < 3 else x.rjust(n) for i, (x, n) in enumerate(zip(r, w))))


def save_json(path, results, engines, variants, batches, meta):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = {"kind": "bench", "meta": meta, "engines": engines, "variants": variants, "batch": batches,
            "results": [{"engine": e, "variant": v, "batch": b, "images_per_s": xs}
                        for (e, v, b), xs in results.items()]}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    print(f"results saved to {path}", file=sys.stderr)


def load_json(path):
    with open(path) as f:
        data = json.load(f)
    if data.get("kind") != "bench":
        sys.exit(f"{path} is not a tools/bench.py --json file")
    results = {(r["engine"], r["variant"], r["batch"]): r["images_per_s"] for r in data["results"]}
    return results, data["engines"], data["variants"], data["batch"], data["meta"]


def plot(path, results, engines, variants, batches, meta):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        from plots import bench_chart
        bench_chart(path, results, engines, variants, batches, meta)
    except ImportError as err:
        sys.exit(f"cannot plot: {err} (.venv/bin/pip install -r tools/requirements.txt)")
    print(f"chart written to {path}", file=sys.stderr)


def onnx_engines_ready(engines, a):
    """Exports the ONNX models the ONNX engines need and checks OpenVINO; returns the engines
    that can run, saying on stderr which were dropped and why."""
    def drop(names, why):
        gone = [e for e in engines if e in names]
        if gone:
            print(f"skipping {', '.join(gone)}: {why}", file=sys.stderr)
            engines[:] = [e for e in engines if e not in gone]
    if any(e in ONNX_ENGINES for e in engines):
        print("exporting ONNX models (cached in .data/bench/) ...", file=sys.stderr)
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "export",
                            "--variants", ",".join(a.variants), "--size", str(a.size)],
                           capture_output=True, text=True, env=worker_env(a.threads), cwd=ROOT)
        if p.returncode != 0:
            drop(ONNX_ENGINES, f"export failed:\n{p.stderr.strip()[-2000:]}")
    for engine in [e for e in engines if e in INT8_ENGINES]:
        print(f"quantising for {engine} (cached in .data/bench/) ...", file=sys.stderr)
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "quantize",
                            "--engines", engine, "--variants", ",".join(a.variants),
                            "--size", str(a.size)],
                           capture_output=True, text=True, env=worker_env(a.threads), cwd=ROOT)
        if p.returncode != 0:
            drop([engine], f"quantisation failed:\n{p.stderr.strip()[-2000:]}")
    if any(e in OPENVINO_PRECISION for e in engines):
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "openvino-caps"],
                           capture_output=True, text=True, env=worker_env(a.threads), cwd=ROOT)
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["no output"])[-1]
            drop(OPENVINO_PRECISION, f"OpenVINO unavailable ({last}; .venv/bin/pip install -r "
                 "tools/requirements.txt)")
        else:
            caps = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"OpenVINO {caps['version']}, CPU plugin capabilities: {', '.join(caps['capabilities'])}",
                  file=sys.stderr)
            if "BF16" not in caps["capabilities"]:
                drop(["openvino-bf16", "openvino-bf16-streams"], "this CPU has no bf16 support "
                     "in OpenVINO (BF16 not in the CPU plugin's OPTIMIZATION_CAPABILITIES)")
    return engines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    csv = lambda s: [x for x in s.split(",") if x]
    ap.add_argument("--variants", type=csv, default=["t0"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=lambda s: [int(x) for x in csv(s)], default=[1, 8, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--engines", type=csv, default=["candle", "pytorch", "onnxruntime"],
                    help="candle, candle:NAME, pytorch, pytorch-cl, onnxruntime, "
                         "onnxruntime-int8, openvino, openvino-bf16, openvino-streams, "
                         "openvino-bf16-streams, openvino-int8")
    ap.add_argument("--channels-last", action="store_true", help="also measure pytorch-cl")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "fasternet-serve"))
    ap.add_argument("--rust-engine-flag", metavar="NAME", help="pass --engine NAME to the binary")
    ap.add_argument("--ratio-against", type=csv, metavar="ENGINES",
                    help="engines to divide by, one `vs` column each (default: those of pytorch, "
                         "onnxruntime, openvino, openvino-bf16 and their -streams in the run)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", metavar="FILE", help="save the raw results (every round) and the machine")
    ap.add_argument("--plot", metavar="FILE.png", help="write a bar chart of the results (matplotlib)")
    ap.add_argument("--plot-from", metavar="FILE.json",
                    help="no measuring: print the table of a --json file and chart it "
                         "(to --plot, default FILE.png)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return run_worker(a)
    if a.plot_from:
        results, engines, variants, batches, meta = load_json(a.plot_from)
        report(results, engines, variants, batches, ratio_bases(engines, a.ratio_against), meta, a.markdown)
        return plot(a.plot or os.path.splitext(a.plot_from)[0] + ".png", results, engines, variants,
                    batches, meta)
    if a.plot:
        try:
            import matplotlib  # noqa: F401  (fail before measuring, not after)
        except ImportError as err:
            ap.error(f"--plot needs matplotlib ({err}): .venv/bin/pip install -r tools/requirements.txt")

    engines = a.engines + (["pytorch-cl"] if a.channels_last and "pytorch-cl" not in a.engines else [])
    if any(e.startswith("candle") for e in engines) and not os.access(a.binary, os.X_OK):
        print(f"skipping candle: {a.binary} not found or not executable (cargo build --release)",
              file=sys.stderr)
        engines = [e for e in engines if not e.startswith("candle")]
    engines = onnx_engines_ready(engines, a)

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
    engines = [e for e in engines if any(k[0] == e for k in results)]
    meta = machine(a, engines)
    if a.json:
        save_json(a.json, results, engines, a.variants, a.batch, meta)
    report(results, engines, a.variants, a.batch, ratio_bases(engines, a.ratio_against), meta, a.markdown)
    if a.plot:
        plot(a.plot, results, engines, a.variants, a.batch, meta)


if __name__ == "__main__":
    main()
