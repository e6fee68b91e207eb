"""TorchServe handler for the same-run peer measurement in docs/performance.md: timm's
FasterNet-T0 with random weights (seed 0), timm's eval transform on PIL at crop 0.9, top-5.
What a hand-rolled TorchServe deployment of this model would run. Usage: tools/torchserve/README.md.
"""

import io
import torch, timm
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

class FasterNetHandler(BaseHandler):
    def initialize(self, context):
        torch.manual_seed(0)
        self.model = timm.create_model("fasternet_t0", pretrained=False).eval()
        cfg = timm.data.resolve_data_config({}, model=self.model)
        cfg["crop_pct"] = 0.9
        self.transform = timm.data.create_transform(**cfg)
        self.initialized = True

    def preprocess(self, data):
        images = []
        for row in data:
            body = row.get("data") or row.get("body")
            images.append(self.transform(Image.open(io.BytesIO(body)).convert("RGB")))
        return torch.stack(images)

    def inference(self, x):
        with torch.inference_mode():
            return self.model(x).softmax(-1)

    def postprocess(self, probs):
        top = probs.topk(5)
        return [[{"class_index": int(i), "score": float(s)} for s, i in zip(ss, ii)]
                for ss, ii in zip(top.values.tolist(), top.indices.tolist())]
