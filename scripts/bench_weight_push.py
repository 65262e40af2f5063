#!/usr/bin/env python
"""Benchmark (not a test): the weight push, learner -> one rollout engine, per transport.

    python scripts/bench_weight_push.py [--models demo,qwen2.5-0.5b-2l] [--pushes 5]

For each model, one learner rank (DeepSpeed ZeRO-2) and one vLLM engine in Ray actors, as a run
places them, and each transport measured side by side in one run: `collective` (a process
group of learner rank 0 and the engine's workers: gloo on CPU), `object_store` (the buckets
through Ray's object store), and `blob`, the path before them (the whole state dict as one
safetensors bytes value through the object store, loaded with one `reload_weights`; it refuses
tied embeddings, so here the LM head that shares the embedding's storage is left out of its
dict by hand). Each push is timed from the driver's call to every side's completion; the
median of --pushes after one warm-up push is reported, with each engine's log-probs of a fixed
sequence checked against the learner's. Writes benchmarks/weight_push.json and prints a table.

Models: `demo` (the demo student, 0.6M parameters, untied) and `qwen2.5-0.5b-2l` (the real
Qwen2.5-0.5B configuration cut to 2 layers: tied embeddings over the 151,936-row vocabulary,
166M parameters).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ASSETS = os.path.join(ROOT, "bench_assets", "weight_push")


def model_dir(name: str) -> str:
    if name == "demo":
        return os.path.join(ROOT, "demo_assets", "student")
    from rayskd.shapes import build

    shape, layers = name.rsplit("-", 1)
    return build(shape, os.path.join(ASSETS, name), os.path.join(ROOT, "demo_assets", "student"),
                 layers=int(layers.removesuffix("l")))


def blob_push(learner, engine):
    """The path before buckets: one safetensors bytes value of the whole state dict."""
    def payload(lrn):
        from safetensors.torch import save

        weights = lrn.full_state_dict()
        if getattr(lrn.model.config, "tie_word_embeddings", False):
            weights.pop("lm_head.weight", None)  # (the old path refused shared storage outright)
        return save(weights)

    def load(eng, blob):
        def reload(worker, data):
            from safetensors.torch import load as load_bytes

            weights = load_bytes(data)
            worker.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
            return len(weights)

        return eng.llm.collective_rpc(reload, args=(blob,))

    blob = learner.actors[0].__ray_call__.remote(payload)
    return [engine.__ray_call__.remote(load, blob)], []


def measure(name: str, pushes: int) -> dict:
    import ray
    from transformers import AutoTokenizer

    from rayskd.actors import actor_env, start_learners
    from rayskd.config import load_config
    from rayskd.rollout_pool import start_rollout
    from rayskd.weight_sync import CollectiveSync, ObjectStoreSync

    path = model_dir(name)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = load_config(os.path.join(ROOT, "configs/demo.yaml"), [f"student.path={path}", "learner.world_size=1"])
    env = {**actor_env(cfg), "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # the blob path sends a function
    learner = start_learners(cfg, len(tok), env)
    engines = start_rollout(cfg, path, 64, env)
    try:
        ray.get(learner.call("ready"))
        engine = engines.actors[0]
        dtype = ray.get(engine.weights_dtype.remote())
        layout = ray.get(learner.actors[0].weight_layout.remote(dtype, cfg.rollout.weight_bucket_mb << 20))
        seq = [1, 2, 3, 4, 5, 6, 7, 8]
        out = {"params": sum(n for n in layout.numels()), "bytes": layout.nbytes(), "buckets": len(layout.buckets),
               "transports": {}}
        syncs = {"collective": CollectiveSync(learner, layout, [1], 120.0), "object_store": ObjectStoreSync(learner, layout)}
        for transport in ("collective", "object_store", "blob"):
            times = []
            if transport != "blob":
                syncs[transport].setup([engine])
            for version in range(1, pushes + 2):
                t0 = time.perf_counter()
                if transport == "blob":
                    loads, side = blob_push(learner, engine)
                else:
                    loads = syncs[transport].push([engine], version)
                    side = syncs[transport].side_refs
                ray.get(loads + side)
                times.append(time.perf_counter() - t0)
            ours = ray.get(engine.sequence_logprobs.remote(seq))
            theirs = ray.get(learner.actors[0].sequence_logprobs.remote(seq))
            out["transports"][transport] = {
                "push_s": round(statistics.median(times[1:]), 4), "first_push_s": round(times[0], 4),
                "pushes_s": [round(t, 4) for t in times[1:]],
                "max_logprob_diff": max(abs(a - b) for a, b in zip(ours, theirs))}
            print(f"[push] {name}: {transport}: {out['transports'][transport]}", flush=True)
        ray.get(engine.shutdown.remote())
        return out
    finally:
        engines.kill()
        learner.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,qwen2.5-0.5b-2l")
    p.add_argument("--pushes", type=int, default=5)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "weight_push.json"))
    args = p.parse_args()
    import platform

    import ray

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        results = {name: measure(name, args.pushes) for name in args.models.split(",")}
    finally:
        ray.shutdown()
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), no GPU",
              "command": " ".join(["python", "scripts/bench_weight_push.py", *sys.argv[1:]]), "models": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    for name, r in results.items():
        line = ", ".join(f"{t} {v['push_s'] * 1000:.0f} ms" for t, v in r["transports"].items())
        print(f"{name} ({r['params'] / 1e6:.1f}M parameters, {r['bytes'] / 2**20:.0f} MiB, {r['buckets']} buckets): {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
