"""The v2 (Open Inference Protocol) endpoints driven by clients nobody here wrote: Triton's
tritonclient (HTTP and gRPC) and the KServe SDK's REST client. Their answers must equal what
/classify and /embed say for the same images. Run by tests/v2_protocol.rs:

    python3 tests/v2/clients.py HTTP_ADDR GRPC_ADDR MODEL_NAME

The KServe SDK runs in a second process: it and tritonclient.grpc both register the
protocol's `inference.*` messages in protobuf's one descriptor pool, which refuses the second.
"""
import asyncio
import json
import struct
import subprocess
import sys
import urllib.request
import zlib
from pathlib import Path

import numpy as np

HTTP, GRPC, MODEL = sys.argv[1:4]
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
# The bundled model: 64x64 input, crop_pct 1, Fashion-MNIST mean and std.
SIDE, MEAN, STD = 64, 0.286, 0.353


def png(pixels):
    """An RGB PNG of a (H, W, 3) uint8 array."""
    h, w, _ = pixels.shape
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\0" + pixels[y].tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# A batch and a single image round differently in the engine's blocked kernels.
TOLERANCE = 1e-5
rng = np.random.default_rng(7)
# Exactly the model's input size: its preprocessing is then only the scaling and
# normalisation, which numpy does below for the FP32 input.
square = (rng.random((SIDE, SIDE, 3)) * 255).astype(np.uint8)
IMAGES = [
    (FIXTURES / "fashion_mnist_t10k_0.png").read_bytes(),
    (FIXTURES / "preprocess/inputs/chelsea.png").read_bytes(),
    png(square),
]
PIXELS = ((square.astype(np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1)[None].copy()


def post(path, body, content_type):
    request = urllib.request.Request(f"http://{HTTP}{path}", data=body, headers={"content-type": content_type})
    with urllib.request.urlopen(request) as r:
        return json.load(r)


def classify(image, k):
    """/classify's answer: [(score, index, label)]."""
    results = post(f"/classify?top_k={k}", image, "application/octet-stream")["results"][0]["predictions"]
    return [(p["score"], p["class_index"], p["label"]) for p in results]


def embed(image):
    return np.array(post("/embed", image, "application/octet-stream")["results"][0]["embedding"], dtype=np.float32)


def parse_classes(strings):
    """Triton's classification strings, b"score:index:label"."""
    out = []
    for s in strings:
        score, index, label = (s.decode() if isinstance(s, bytes) else s).split(":", 2)
        out.append((float(score), int(index), label))
    return out


def same_classes(got, expected, what):
    assert [(i, l) for _, i, l in got] == [(i, l) for _, i, l in expected], f"{what}: {got} != {expected}"
    assert all(abs(a[0] - b[0]) < TOLERANCE for a, b in zip(got, expected)), f"{what}: {got} != {expected}"


def probabilities_match_classify(probabilities, image, what):
    expected = classify(image, 10)
    for score, index, _ in expected:
        assert abs(probabilities[index] - score) < TOLERANCE, f"{what}: class {index} {probabilities[index]} != {score}"


checks = 0
# Each protocol's answer for IMAGES, all outputs: the oracle for later checks.
PROBABILITIES = {}


def check(name):
    global checks
    checks += 1
    print(f"ok {checks}: {name}", flush=True)


def triton(client, module, protocol):
    from tritonclient.utils import InferenceServerException

    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    meta = client.get_server_metadata()
    meta = meta if isinstance(meta, dict) else {"extensions": list(meta.extensions)}
    assert {"classification", "binary_tensor_data"} <= set(meta["extensions"]), meta
    model = client.get_model_metadata(MODEL)
    model = model if isinstance(model, dict) else {
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in model.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in model.outputs]}
    assert {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, SIDE, SIDE]} in model["inputs"], model
    assert {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]} in model["outputs"], model
    check(f"tritonclient {protocol}: health and metadata")

    images = module.InferInput("image", [len(IMAGES)], "BYTES")
    images.set_data_from_numpy(np.array(IMAGES, dtype=np.object_))
    outputs = [module.InferRequestedOutput("probabilities", class_count=3), module.InferRequestedOutput("features")]
    result = client.infer(MODEL, [images], outputs=outputs)
    top3 = result.as_numpy("probabilities")
    features = result.as_numpy("features")
    assert top3.shape == (len(IMAGES), 3) and features.shape == (len(IMAGES), 1280), (top3.shape, features.shape)
    for i, image in enumerate(IMAGES):
        same_classes(parse_classes(top3[i]), classify(image, 3), f"{protocol} image {i}")
        np.testing.assert_allclose(features[i], embed(image), rtol=TOLERANCE, atol=TOLERANCE)
    check(f"tritonclient {protocol}: BYTES images, classification extension and features equal /classify and /embed")

    result = client.infer(MODEL, [images])
    probabilities = result.as_numpy("probabilities")
    PROBABILITIES[protocol] = probabilities
    assert probabilities.shape == (len(IMAGES), 10) and result.as_numpy("features").shape == (len(IMAGES), 1280)
    for i, image in enumerate(IMAGES):
        probabilities_match_classify(probabilities[i], image, f"{protocol} all outputs, image {i}")
    check(f"tritonclient {protocol}: no outputs named returns both, equal to /classify")

    pixels = module.InferInput("pixels", list(PIXELS.shape), "FP32")
    pixels.set_data_from_numpy(PIXELS)
    result = client.infer(MODEL, [pixels], outputs=[module.InferRequestedOutput("probabilities")])
    np.testing.assert_allclose(result.as_numpy("probabilities")[0], probabilities[2], rtol=0, atol=TOLERANCE)
    check(f"tritonclient {protocol}: FP32 pixels preprocessed by numpy equal the PNG's answer")

    for call, expected in [
        (lambda: client.infer("no-such-model", [images]), ("404", "NOT_FOUND")),
        (lambda: client.infer(MODEL, [images], outputs=[module.InferRequestedOutput("logits")]), ("422", "INVALID_ARGUMENT")),
    ]:
        try:
            call()
        except InferenceServerException as e:
            assert any(code in str(e.status()) for code in expected) and "unknown" in e.message(), (e.status(), e.message())
        else:
            raise AssertionError("an error was expected")
    check(f"tritonclient {protocol}: unknown model and output are errors with the protocol's codes")


def grpc_typed_contents(probabilities):
    """gRPC with typed `contents` instead of `raw_input_contents` (tritonclient always sends
    raw), through the stub tritonclient ships; answers must equal the raw path's."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc as rpc

    stub = rpc.GRPCInferenceServiceStub(grpc.insecure_channel(GRPC))
    def infer(tensor):
        request = pb.ModelInferRequest(model_name=MODEL, inputs=[tensor])
        request.outputs.add(name="probabilities")
        response = stub.ModelInfer(request)
        assert [o.name for o in response.outputs] == ["probabilities"], response.outputs
        return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(-1, 10)
    tensor = pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="FP32", shape=list(PIXELS.shape))
    tensor.contents.fp32_contents.extend(PIXELS.ravel().tolist())
    np.testing.assert_allclose(infer(tensor)[0], probabilities[2], rtol=0, atol=TOLERANCE)
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[len(IMAGES)])
    tensor.contents.bytes_contents.extend(IMAGES)
    np.testing.assert_allclose(infer(tensor), probabilities, rtol=0, atol=TOLERANCE)
    check("grpc: typed FP32 and BYTES contents equal the raw path")


def triton_http_json():
    """JSON without the binary extension, both ways."""
    import tritonclient.http as httpclient
    client = httpclient.InferenceServerClient(HTTP)
    pixels = httpclient.InferInput("pixels", list(PIXELS.shape), "FP32")
    pixels.set_data_from_numpy(PIXELS, binary_data=False)
    plain = client.infer(MODEL, [pixels], outputs=[
        httpclient.InferRequestedOutput("probabilities", binary_data=False),
        httpclient.InferRequestedOutput("features", binary_data=True)])
    response = plain.get_response()
    outputs = {o["name"]: o for o in response["outputs"]}
    assert "data" in outputs["probabilities"] and "binary_data_size" in outputs["features"]["parameters"], response
    probabilities_match_classify(plain.as_numpy("probabilities")[0], IMAGES[2], "JSON FP32")
    check("tritonclient http: JSON FP32 input, JSON and binary outputs in one response")


async def kserve_rest():
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    client = InferenceRESTClient(RESTConfig(protocol="v2"))
    base = f"http://{HTTP}"
    assert await client.is_server_live(base) and await client.is_server_ready(base)
    assert await client.is_model_ready(base, MODEL)
    images = InferInput("image", [len(IMAGES)], "BYTES")
    images.set_data_from_numpy(np.array(IMAGES, dtype=np.object_), binary_data=True)
    response = await client.infer(base, InferRequest(model_name=MODEL, infer_inputs=[images]), model_name=MODEL)
    outputs = {o.name: o.as_numpy() for o in response.outputs}
    for i, image in enumerate(IMAGES):
        probabilities_match_classify(outputs["probabilities"][i], image, f"kserve image {i}")
        np.testing.assert_allclose(outputs["features"][i], embed(image), rtol=TOLERANCE, atol=TOLERANCE)
    pixels = InferInput("pixels", list(PIXELS.shape), "FP32")
    pixels.set_data_from_numpy(PIXELS, binary_data=False)
    response = await client.infer(base, InferRequest(model_name=MODEL, infer_inputs=[pixels]), model_name=MODEL)
    probabilities = {o.name: o.as_numpy() for o in response.outputs}["probabilities"]
    probabilities_match_classify(probabilities[0], IMAGES[2], "kserve FP32")
    await client.close()
    check("kserve InferenceRESTClient: health, BYTES (binary) and FP32 (JSON) equal /classify and /embed")


if sys.argv[4:] == ["kserve"]:
    asyncio.run(kserve_rest())
else:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    triton(httpclient.InferenceServerClient(HTTP), httpclient, "http")
    triton(grpcclient.InferenceServerClient(GRPC), grpcclient, "grpc")
    grpc_typed_contents(PROBABILITIES["grpc"])
    triton_http_json()
    subprocess.run([sys.executable, __file__, *sys.argv[1:4], "kserve"], check=True)
    print(f"all {checks + 1} checks passed")
