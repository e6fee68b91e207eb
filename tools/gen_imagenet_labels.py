#!/usr/bin/env python3
"""Write src/labels/imagenet.txt: the 1000 ImageNet-1k class names in class-index order, from
timm's bundled synset lists (timm/data/_info). Run: .venv/bin/python tools/gen_imagenet_labels.py"""
import os

import timm

info = os.path.join(os.path.dirname(timm.__file__), "data", "_info")
synsets = [l.strip() for l in open(os.path.join(info, "imagenet_synsets.txt")) if l.strip()]
lemmas = dict(l.rstrip("\n").split("\t", 1) for l in open(os.path.join(info, "imagenet_synset_to_lemma.txt")) if l.strip())
assert len(synsets) == 1000
with open(os.path.join(os.path.dirname(__file__), "..", "src", "labels", "imagenet.txt"), "w") as f:
    f.writelines(lemmas[s] + "\n" for s in synsets)
