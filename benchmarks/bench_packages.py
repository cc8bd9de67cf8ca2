"""Installing a signed `.expert` package, verification included, against a plain unpack-and-copy.

    python benchmarks/bench_packages.py [--mb 10] [--repeats 7] [--store STORE]

A package with a ~MB-sized safetensors adapter (random float32 weights, so gzip cannot shrink it)
is signed and installed with `Registry.install`: streamed safe unpack with every member checked,
sha256 of every file against the manifest, the safetensors header check, the ed25519 signature
against the trusted keys, the base-fingerprint check, then activation (materialise
`experts/NAME`, rewrite `experts/index.json` and the router's profiles, each temp-then-rename).
The baseline is what an installer without any checks does: `tarfile.extractall` into a temp
directory and a copy of the adapter into `experts/NAME`. Each run installs into a fresh copy of the
store. With `--store` the store's base fingerprint and encoder dimension are used (the store is
copied, never written); else a minimal store is made. Prints JSON: medians and the ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np


def make_store(root: Path, mb: float, template: Path | None) -> Path:
    from safetensors.numpy import save_file

    fingerprint, dim = "ab" * 32, 384
    if template is not None:
        shutil.copytree(template, root)
        fingerprint = json.loads((root / "manifests" / "base.json").read_text())["metrics"]["fingerprint"]
    else:
        (root / "manifests").mkdir(parents=True)
        (root / "manifests" / "base.json").write_text(json.dumps({"metrics": {"fingerprint": fingerprint}}))
        (root / "experts").mkdir()
        (root / "experts" / "index.json").write_text(json.dumps({"experts": [], "aliases": {}}))
    expert = root / "experts" / "bench-source"
    expert.mkdir()
    n = int(mb * 1e6 / 4 / 1024)
    save_file({"base_model.lora_A.weight": np.random.default_rng(0).standard_normal((n, 1024)).astype(np.float32)},
              str(expert / "adapter_model.safetensors"))
    (expert / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (expert / "manifest.json").write_text(json.dumps({
        "name": "bench-source", "base_model": {"name": "store:base", "fingerprint": fingerprint},
        "adapter": {"type": "lora", "r": 8}, "training": {"tokens": 1}, "category": {"name": "bench"},
        "routing": {"keywords": ["bench"]}, "centroid": [0.01] * dim, "rows": 1}))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=10.0, help="adapter size in MB")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--store", type=Path, default=None, help="a built store to copy (optional)")
    args = parser.parse_args()

    from imoe_ray.config import PackagesConfig
    from imoe_ray.packaging.archive import resign
    from imoe_ray.packaging.registry import Registry, package_expert
    from imoe_ray.packaging.signing import generate_keys, load_signing_key, sign

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        template = make_store(work / "template", args.mb, args.store)
        private, public = generate_keys(work / "keys")
        pkg, manifest = package_expert(template, "bench-source", "1.0.0", work / "bench.expert", new_name="bench")
        resign(pkg, sign(manifest, load_signing_key(private)))
        cfg = PackagesConfig(trusted_keys=[str(public)])
        ours, baseline = [], []
        for i in range(args.repeats):
            store = work / f"s{i}"
            shutil.copytree(template, store)
            started = time.perf_counter()
            Registry(store, cfg).install(str(pkg))
            ours.append(time.perf_counter() - started)

            plain = work / f"p{i}"
            shutil.copytree(template, plain)
            started = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=plain) as t, tarfile.open(pkg) as tar:
                tar.extractall(t, filter="fully_trusted")
                shutil.copytree(Path(t) / "adapter", plain / "experts" / "bench")
            baseline.append(time.perf_counter() - started)
            shutil.rmtree(store)
            shutil.rmtree(plain)
        result = {"package_mb": round(pkg.stat().st_size / 1e6, 2), "adapter_mb": args.mb, "repeats": args.repeats,
                  "install_verified_s": round(statistics.median(ours), 4),
                  "baseline_extract_copy_s": round(statistics.median(baseline), 4),
                  "ratio_verified_over_baseline": round(statistics.median(ours) / statistics.median(baseline), 2),
                  "target_s": 1.0}
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
