#!/usr/bin/env python3
"""Offline validation of custom resources against their CRDs' OpenAPI schemas (kubernetes-validate
only ships the built-in API schemas). Needs PyYAML, and jsonschema to validate.

    crdschema.py trim REPO_URL GIT_DIR REF OUT.json CRD_PATH...
        Reads each CRD_PATH at REF from GIT_DIR, a clone of REPO_URL (a work tree or a bare
        mirror), keeps the openAPIV3Schema of every served version, drops the descriptions and
        moves subtrees that occur more than once (the Container, PodSpec and Probe schemas, which
        the InferenceService repeats for every predictor framework) into shared "$defs", then
        writes OUT.json with the source (repository, ref, commit, blob ids) recorded, and the
        repository's LICENSE beside it as <repository name>-LICENSE. Nothing else changes:
        validation against the output accepts and rejects what the original does.
    crdschema.py validate SCHEMAS.json RENDERED.yaml...
        Validates every document whose apiVersion/kind SCHEMAS.json has a schema for, the way
        the API server does with strict field validation (kubectl's default): unknown fields are
        errors, except under x-kubernetes-preserve-unknown-fields. A document of a group that
        SCHEMAS.json covers but a kind it lacks is an error too (regenerate with `trim`); other
        custom resources are listed as not validated. Exits 1 on any error.

What the API server checks beyond this: metadata in full (only its common fields are checked
here), list-map key uniqueness (x-kubernetes-list-type: map), integer formats' ranges, and the
KServe admission webhooks (manifests.py check-kserve covers the rules that matter here).
"""
import hashlib
import json
import os
import subprocess
import sys

import yaml

MIN_SHARED = 400  # bytes of canonical JSON below which a repeated subtree stays inline


def git(git_dir, *args):
    return subprocess.run(["git", "-C", git_dir, *args], check=True, capture_output=True, text=True).stdout


def strip_descriptions(node, names=False):
    """Drops the `description` keywords; `names` marks a properties map, whose keys are field
    names (a field may be called description)."""
    if isinstance(node, dict):
        return {k: strip_descriptions(v, not names and k == "properties") for k, v in node.items()
                if names or k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def share_repeated(roots):
    """Moves the largest subtree that occurs twice or more into defs, replacing every occurrence
    by a $ref, until no repeated subtree of MIN_SHARED bytes or more is left. Deterministic:
    ties go to the subtree met first."""
    defs = {}
    while True:
        seen = {}  # digest -> [size, first index, path, count, node]
        digests = {}  # id(node) -> digest, for the replacement below
        order = [0]

        def visit(node, path):
            # Returns (digest, size) of the node's canonical JSON, bottom-up.
            if isinstance(node, dict):
                parts, size = [], 2
                for k in sorted(node):
                    d, s = visit(node[k], path + [k])
                    parts.append(json.dumps(k) + ":" + d)
                    size += len(k) + 3 + s
                digest = hashlib.sha1(("{" + ",".join(parts) + "}").encode()).hexdigest()
                if "$ref" not in node and size >= MIN_SHARED:
                    digests[id(node)] = digest
                    e = seen.get(digest)
                    if e:
                        e[3] += 1
                    else:
                        order[0] += 1
                        seen[digest] = [size, order[0], path, 1, node]
                return digest, size
            if isinstance(node, list):
                parts, size = [], 2
                for i, v in enumerate(node):
                    d, s = visit(v, path + [i])
                    parts.append(d)
                    size += s + 1
                return hashlib.sha1(("[" + ",".join(parts) + "]").encode()).hexdigest(), size
            text = json.dumps(node, sort_keys=True)
            return hashlib.sha1(text.encode()).hexdigest(), len(text)

        for name, root in roots.items():
            visit(root, [name])
        for name, d in defs.items():
            visit(d, ["$defs", name])
        repeated = [(e[0], -e[1], digest) for digest, e in seen.items() if e[3] >= 2]
        if not repeated:
            return defs
        _, _, digest = max(repeated)
        size, _, path, _, node = seen[digest]
        label = next((p for p in reversed(path) if isinstance(p, str)
                      and p not in ("properties", "items", "additionalProperties", "anyOf", "$defs")), "node")
        name, n = label, 1
        while name in defs:
            n += 1
            name = f"{label}-{n}"
        defs[name] = json.loads(json.dumps(node))
        ref = {"$ref": f"#/$defs/{name}"}

        def replace(parent):
            items = parent.items() if isinstance(parent, dict) else enumerate(parent)
            for k, v in list(items):
                if isinstance(v, (dict, list)):
                    if digests.get(id(v)) == digest:
                        parent[k] = dict(ref)
                    else:
                        replace(v)

        for root in roots.values():
            replace(root)
        for other, d in list(defs.items()):
            if other != name:
                replace(d)


def trim(url, git_dir, ref, out, *paths):
    commit = git(git_dir, "rev-parse", f"{ref}^{{commit}}").strip()
    files, roots = {}, {}
    for p in paths:
        files[p] = git(git_dir, "rev-parse", f"{ref}:{p}").strip()
        crd = yaml.safe_load(git(git_dir, "show", f"{ref}:{p}"))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if v.get("served"):
                roots[f"{group}/{v['name']}/{kind}"] = strip_descriptions(v["schema"]["openAPIV3Schema"])
    defs = share_repeated(roots)
    lic = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git") + "-LICENSE"
    with open(os.path.join(os.path.dirname(out), lic), "w") as f:
        f.write(git(git_dir, "show", f"{ref}:LICENSE"))
    files["LICENSE"] = git(git_dir, "rev-parse", f"{ref}:LICENSE").strip()
    doc = {
        "source": {"repository": url, "ref": ref, "commit": commit, "files": files},
        "license": f"the repository's LICENSE (for KServe: Apache-2.0), copied to {lic} next to this file",
        "changes": "openAPIV3Schema of each served version only; descriptions removed; subtrees that "
                   "occur more than once moved to $defs and referenced. Regenerate with "
                   "deploy/ci/crdschema.py trim.",
        "schemas": roots,
        "$defs": defs,
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    print(f"{out}: {', '.join(roots)}; {len(defs)} shared subtrees; from {ref} ({commit[:12]})")


# Metadata fields a manifest may set (the CRD schemas only say `type: object`; the API server
# validates ObjectMeta itself and rejects unknown fields under strict validation).
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
}


def strict(node):
    """The schema as the API server applies it with strict field validation: an object schema
    with properties and no additionalProperties admits no other fields."""
    if isinstance(node, list):
        return [strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def validate(schemas_path, *rendered):
    import jsonschema

    with open(schemas_path) as f:
        bundle = json.load(f)
    defs = strict(bundle["$defs"])
    groups = {k.split("/")[0] for k in bundle["schemas"]}
    validators = {}
    for key, schema in bundle["schemas"].items():
        root = strict(schema)
        root["properties"] = dict(root["properties"], metadata=OBJECT_META)
        root["$defs"] = defs
        jsonschema.Draft7Validator.check_schema(root)
        validators[key] = jsonschema.Draft7Validator(root)
    src = bundle["source"]
    print(f"  schemas: {', '.join(sorted(validators))} (KServe {src['ref']}, {src['commit'][:12]})")
    failed = checked = 0
    for path in rendered:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for d in docs:
            api, kind = d.get("apiVersion", ""), d.get("kind", "")
            name = f"{kind}/{(d.get('metadata') or {}).get('name')}"
            group = api.split("/")[0] if "/" in api else ""
            v = validators.get(f"{api}/{kind}")
            if v is None:
                if group in groups:
                    print(f"  ERROR: {path}: {api} {name}: no schema for this kind/version in {schemas_path}")
                    failed += 1
                else:
                    print(f"  {path}: {api} {name}: no schema here (not validated)")
                continue
            errs = sorted(v.iter_errors(d), key=lambda e: list(map(str, e.absolute_path)))
            for e in errs:
                where = ".".join(str(p) for p in e.absolute_path) or "(root)"
                print(f"  ERROR: {path}: {name}: {where}: {e.message}")
            failed += bool(errs)
            checked += 1
            if not errs:
                print(f"  {path}: {api} {name}: valid (strict)")
    if checked == 0 and failed == 0:
        print("  ERROR: no document had a schema to validate against")
        return 1
    return 1 if failed else 0


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "trim" and len(args) >= 5:
        trim(*args)
        return 0
    if cmd == "validate" and len(args) >= 2:
        return validate(*args)
    raise SystemExit(__doc__)


if __name__ == "__main__":
    sys.exit(main())
