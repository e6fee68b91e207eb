#!/usr/bin/env python3
"""Generate FasterNet numerics fixtures (weights + reference outputs) from timm's `FasterNet`.

Regenerate the committed tiny cases (tests/fixtures/model/) and the opt-in full-size cases
(.data/parity-full/, git-ignored) with:

    .venv/bin/python tools/gen_parity_fixtures.py
    .venv/bin/python tools/gen_parity_fixtures.py --full .data/parity-full

The reference is `timm.models.fasternet.FasterNet` (timm 1.0.31). Every parameter and buffer is
randomised (conv/linear weights ~ N(0, 1/fan_in) so activations neither vanish nor explode,
classifier bias, and every BatchNorm's weight/bias/running_mean/running_var), so a wrong BN fold,
a swapped partial-conv slice or a wrong activation shows up in the logits. Expected outputs are
computed in float64 from the float32 weights (`model.double()`, double input), then stored as
float32.

Per case NAME:
  NAME.json                 config: embed_dim, depths, feature_dim, num_classes, act, mlp_ratio,
                            n_div, inputs (names of the input tensors in NAME.io.safetensors)
  NAME.timm.safetensors     timm state_dict as is (incl. int64 `num_batches_tracked`), fp32
  NAME.official.safetensors same weights under the official JierunChen/FasterNet key names,
                            in official module order
  NAME.official.pth         same, `torch.save` zip format; wrapped per case (see CASES)
  NAME.official_model.pth   (tiny_relu only) {"model": sd, "epoch": 3}
  NAME.io.safetensors       input/logits/features (batch 2, square) and
                            input_odd/logits_odd/features_odd (batch 1, odd non-square size)

Before writing, the official-named dict is mapped back to timm names (the official->timm rules
below), loaded strictly into a fresh timm model and checked to give bit-identical logits.
"""
import argparse
import copy
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.nn as nn
from safetensors.torch import save_file

from timm.models.fasternet import FasterNet

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "model")
FULL_OUT = os.path.join(REPO_ROOT, ".data", "parity-full")

# pth_wrap: how NAME.official.pth stores the dict: "state_dict" -> {"state_dict": sd},
# "plain" -> sd. extra_model_ckpt: also write NAME.official_model.pth as {"model": sd, "epoch": 3}.
TINY_CASES = [
    dict(name="tiny_gelu", embed_dim=8, depths=(1, 1, 2, 1), feature_dim=32, num_classes=7,
         act="gelu", input=(2, 3, 64, 64), input_odd=(1, 3, 45, 70), seed=1001,
         pth_wrap="state_dict", extra_model_ckpt=False),
    dict(name="tiny_relu", embed_dim=6, depths=(1, 2, 1, 1), feature_dim=24, num_classes=5,
         act="relu", input=(2, 3, 64, 64), input_odd=(1, 3, 33, 50), seed=1002,
         pth_wrap="plain", extra_model_ckpt=True),
]
FULL_CASES = [
    dict(name="t0_224", embed_dim=40, depths=(1, 2, 8, 2), feature_dim=1280, num_classes=1000,
         act="gelu", input=(2, 3, 224, 224), input_odd=(1, 3, 160, 256), seed=2001,
         pth_wrap="plain", extra_model_ckpt=False),
    dict(name="t2_224", embed_dim=96, depths=(1, 2, 8, 2), feature_dim=1280, num_classes=1000,
         act="relu", input=(1, 3, 224, 224), input_odd=(1, 3, 160, 256), seed=2002,
         pth_wrap="plain", extra_model_ckpt=False),
]

MLP_RATIO = 2.0
N_DIV = 4

# Official (JierunChen/FasterNet) -> timm key prefixes, as in timm's (commented-out)
# checkpoint_filter_fn. Official `stages` is a flat Sequential: BasicStage, PatchMerging, ...
OFFICIAL_TO_TIMM = [
    ("stages.1.", "stages.1.downsample."),
    ("stages.2.", "stages.1."),
    ("stages.3.", "stages.2.downsample."),
    ("stages.4.", "stages.2."),
    ("stages.5.", "stages.3.downsample."),
    ("stages.6.", "stages.3."),
    ("avgpool_pre_head.1.weight", "conv_head.weight"),
    ("head.", "classifier."),
]


def official_to_timm_key(k):
    for old, new in OFFICIAL_TO_TIMM:
        if k.startswith(old):
            return new + k[len(old):]
    return k  # patch_embed.*, stages.0.*


def timm_to_official_key(k):
    m = re.match(r"^stages\.(\d+)\.downsample\.(.*)$", k)
    if m:
        return f"stages.{2 * int(m.group(1)) - 1}.{m.group(2)}"
    m = re.match(r"^stages\.(\d+)\.blocks\.(.*)$", k)
    if m:
        return f"stages.{2 * int(m.group(1))}.blocks.{m.group(2)}"
    if k == "conv_head.weight":
        return "avgpool_pre_head.1.weight"
    if k.startswith("classifier."):
        return "head." + k[len("classifier."):]
    assert k.startswith("patch_embed."), k
    return k


def _official_sort_key(item):
    """Official module order: patch_embed, stages.0 .. stages.6 (merging before the next stage's
    blocks), avgpool_pre_head, head. Within a submodule the timm order is kept (it is the same as
    the official one: in MLPBlock `mlp` is registered before `spatial_mixing` in both)."""
    idx, k = item
    if k.startswith("patch_embed."):
        return (0, 0, idx)
    m = re.match(r"^stages\.(\d+)\.", k)
    if m:
        return (1, int(m.group(1)), idx)
    if k.startswith("avgpool_pre_head."):
        return (2, 0, idx)
    if k.startswith("head."):
        return (3, 0, idx)
    raise AssertionError(k)


def to_official(timm_sd):
    renamed = [(i, timm_to_official_key(k)) for i, k in enumerate(timm_sd)]
    keys = list(timm_sd)
    out = {}
    for i, ok in sorted(renamed, key=_official_sort_key):
        assert ok not in out, ok
        out[ok] = timm_sd[keys[i]]
    return out


def build(case):
    act = {"gelu": nn.GELU, "relu": nn.ReLU}[case["act"]]
    return FasterNet(num_classes=case["num_classes"], embed_dim=case["embed_dim"],
                     depths=case["depths"], feature_dim=case["feature_dim"], act_layer=act,
                     mlp_ratio=MLP_RATIO, n_div=N_DIV, drop_path_rate=0.0)


@torch.no_grad()
def randomise(model, gen):
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / fan_in ** 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.5)
        elif isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=gen) + 0.5)           # U(0.5, 1.5)
            m.bias.copy_(torch.randn(c, generator=gen) * 0.1)            # N(0, 0.1)
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)    # N(0, 0.1)
            m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)  # U(0.5, 2.0)
            m.num_batches_tracked.fill_(int(torch.randint(1, 100000, (1,), generator=gen)))


@torch.no_grad()
def reference(model64, x):
    x64 = x.double()
    logits = model64(x64)
    feats = model64.forward_head(model64.forward_features(x64), pre_logits=True)
    return logits.float(), feats.float()


def save_pth(obj, path):
    torch.save(obj, path)  # zip format (default)


def run_case(case, out_dir):
    name = case["name"]
    gen = torch.Generator().manual_seed(case["seed"])
    model = build(case).eval()
    randomise(model, gen)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for k, v in sd.items():
        assert v.dtype == (torch.int64 if k.endswith("num_batches_tracked") else torch.float32), k

    x = torch.randn(case["input"], generator=gen)
    x_odd = torch.randn(case["input_odd"], generator=gen)

    model64 = copy.deepcopy(model).double().eval()
    logits, feats = reference(model64, x)
    logits_odd, feats_odd = reference(model64, x_odd)
    assert feats.shape == (case["input"][0], case["feature_dim"])
    assert logits.shape == (case["input"][0], case["num_classes"])

    # float32 forward, for information (what a float32 implementation should get close to)
    with torch.no_grad():
        d32 = (model(x) - logits).abs().max().item()

    # Prove the official naming: official -> timm mapping, strict load, identical logits.
    official = to_official(sd)
    assert len(official) == len(sd)
    back = {official_to_timm_key(k): v for k, v in official.items()}
    assert set(back) == set(sd), set(back) ^ set(sd)
    check = build(case).eval()
    check.load_state_dict(back, strict=True)
    check64 = check.double().eval()
    with torch.no_grad():
        assert torch.equal(check64(x.double()).float(), logits), "official naming round trip"
        assert torch.equal(check64(x_odd.double()).float(), logits_odd)

    os.makedirs(out_dir, exist_ok=True)
    p = lambda suffix: os.path.join(out_dir, name + suffix)
    meta = {"embed_dim": case["embed_dim"], "depths": list(case["depths"]),
            "feature_dim": case["feature_dim"], "num_classes": case["num_classes"],
            "act": case["act"], "mlp_ratio": MLP_RATIO, "n_div": N_DIV,
            "inputs": ["input", "input_odd"]}
    with open(p(".json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    save_file(sd, p(".timm.safetensors"))
    save_file(official, p(".official.safetensors"))
    if case["pth_wrap"] == "state_dict":
        save_pth({"state_dict": official}, p(".official.pth"))
    else:
        save_pth(official, p(".official.pth"))
    if case["extra_model_ckpt"]:
        save_pth({"model": official, "epoch": 3}, p(".official_model.pth"))
    save_file({"input": x.contiguous(), "logits": logits.contiguous(),
               "features": feats.contiguous(), "input_odd": x_odd.contiguous(),
               "logits_odd": logits_odd.contiguous(), "features_odd": feats_odd.contiguous()},
              p(".io.safetensors"))
    for f in os.listdir(out_dir):  # safetensors writes 0600 files
        if f.startswith(name + "."):
            os.chmod(os.path.join(out_dir, f), 0o644)

    n_params = sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    n_learn = sum(prm.numel() for prm in model.parameters())
    print(f"{name}: {n_learn} parameters ({n_params} incl. BN running stats), "
          f"logits |max| {logits.abs().max():.3f} std {logits.std():.3f}, "
          f"features |max| {feats.abs().max():.3f}, "
          f"odd logits |max| {logits_odd.abs().max():.3f}, fp32-vs-fp64 max diff {d32:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", nargs="?", const=FULL_OUT, default=None, metavar="OUTDIR",
                    help=f"write the full-size cases (t0_224, t2_224) to OUTDIR (default {FULL_OUT}) "
                         "instead of the tiny committed cases")
    ap.add_argument("--out", default=TINY_OUT, help="output directory for the tiny cases")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.full:
        for case in FULL_CASES:
            run_case(case, args.full)
    else:
        for case in TINY_CASES:
            run_case(case, args.out)


if __name__ == "__main__":
    main()
