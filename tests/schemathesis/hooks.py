"""Schemathesis hooks for fasternet-serve (SCHEMATHESIS_HOOKS=hooks, with this folder on
PYTHONPATH): request bodies hold real images, so that "schema-valid" means what the server
accepts. Everything else (query parameters, content types, counts) is generated from the
OpenAPI document as served. tests/server_api.rs runs it.
"""
import base64
import struct
import zlib

import schemathesis
from hypothesis import strategies as st


def png(width, height, seed):
    """A greyscale PNG with a gradient that depends on seed."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\0" + bytes((x * 7 + y * 3 + seed) % 256 for x in range(width)) for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# The server refuses images whose longer side is more than 32 times the shorter one.
IMAGES = st.tuples(st.integers(1, 48), st.integers(1, 48), st.integers(0, 255)).filter(
    lambda t: max(t[0], t[1]) <= 32 * min(t[0], t[1])
).map(lambda t: png(*t))

schemathesis.openapi.media_type("image/*", IMAGES)
schemathesis.openapi.media_type("application/octet-stream", IMAGES)


def is_base64(item):
    try:
        base64.b64decode(item, validate=True)
        return True
    except ValueError:
        return False


@schemathesis.hook
def map_body(ctx, body):
    """JSON and multipart bodies: as many images as generated, each a real one (sizes vary
    with the position, so a request mixes shapes). What makes a body schema-violating stays:
    a JSON body keeps its other properties and the items that are not base64 text. A multipart
    body keeps only its images, since every part of one is read as an image (any part name)."""
    if isinstance(body, dict) and isinstance(body.get("images"), list) and body["images"]:
        images = [png(8 + 5 * i % 40, 8 + 3 * i % 30, i) for i in range(len(body["images"]))]
        # Multipart file parts come as schemathesis' Binary (a str subclass holding bytes).
        binary = [type(item) for item in body["images"] if hasattr(item, "data")]
        if binary:
            return {"images": [binary[0](data) for data in images]}
        real = [
            base64.b64encode(image).decode() if isinstance(item, str) and is_base64(item) else item
            for item, image in zip(body["images"], images)
        ]
        return {**body, "images": real}
    if isinstance(body, dict) and isinstance(body.get("inputs"), list) and body["inputs"]:
        # A v2 inference request: its one input becomes a real image; the outputs asked for
        # keep their count, named after the model's; binary outputs (another content type)
        # are not asked for.
        body = {k: v for k, v in body.items() if k != "parameters"}
        image = base64.b64encode(png(8, 8, len(body["inputs"]))).decode()
        body["inputs"] = [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}]
        if isinstance(body.get("outputs"), list):
            body["outputs"] = [{"name": name} for name in ["probabilities", "features"][: len(body["outputs"])]]
    return body
