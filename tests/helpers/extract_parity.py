"""Run `extract` for several configs in one process and compare rows with model.apply one by one.

Usage: python extract_parity.py LISTFILE WORKDIR CONFIGS_JSON  (set XLA_FLAGS for the device count)
Prints one JSON line: per config, max abs difference, row/failure counts, compiled programs.
"""
import json
import sys

import jax
import numpy as np

import beit_jax
from beit_jax.extract import extract, read_failures, read_features
from beit_jax.transforms import ImageLoadError, load_image

def main():
    list_file, workdir, configs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    model, variables = beit_jax.create_model("test_beit", rng=7)
    transform = beit_jax.create_transform(**beit_jax.resolve_data_config(model))
    fwd = jax.jit(lambda v, x: model.apply(v, model.apply(v, x, method="forward_features"), pre_logits=True,
                                           method="forward_head"))
    reference, broken = {}, []
    for line in open(list_file):
        p = line.strip()
        try:
            reference[p] = np.asarray(fwd(variables, transform(load_image(p))[None]))[0]
        except ImageLoadError:
            broken.append(p)

    report = {"devices": jax.device_count(), "readable": len(reference), "broken": sorted(broken), "runs": []}
    for i, cfg in enumerate(configs):
        out = f"{workdir}/run{i}"
        summary = extract(list_file, out, model, variables, batch_size=cfg["batch_size"], parallel=cfg["parallel"],
                          workers=cfg.get("workers", 2), backend=cfg.get("backend", "thread"),
                          shard_size=cfg.get("shard_size", 4096), progress=False)
        paths, feats = read_features(out)
        failed = read_failures(out)
        diffs = [float(np.abs(f - reference[p]).max()) for p, f in zip(paths, feats)]
        report["runs"].append(dict(cfg, paths=paths, max_abs=max(diffs), failed=[f["path"] for f in failed],
                                   errors=[f["error"] for f in failed], compiled=summary["compiled_programs"],
                                   summary_failed=summary["failed"]))
    print(json.dumps(report))


if __name__ == "__main__":  # the process decode backend spawns workers that import this file
    main()
