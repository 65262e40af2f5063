"""Benchmark (not a test): Sparse Logit Sampling against top-k at equal payload on the demo
(issue 28.2; arXiv 2503.16870 reports top-k distillation miscalibrating the student where
sampled targets do not). Distillation alone with forward KL (algorithm.pg_coef=0), the demo's
config otherwise, for each teacher signal:

  topk4     teacher.top_k=4: 4 ids + log-probs + the tail bucket, 40.6 bytes per token
  sparse3   teacher.sparse_samples=3: 3 drawn ids + log-probs + log weights, 40.7 bytes

(benchmarks/payload.json: 8k + 8 and 12N + 4 bytes), each with --seeds seeds. The final
students are judged against the teacher exactly over the whole vocabulary (the demo's 13
tokens), teacher-forced on the held-out prompts' reference answers: forward and reverse KL,
entropy, and the expected calibration error (10 equal-width confidence bins; confidence the
top probability, correct when its token is the reference's), the initial student and the
teacher beside them. Writes benchmarks/sparse_calibration.json.

    source scripts/_env.sh && python scripts/compare_sparse.py --seeds 2 --steps 40
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {
    "topk4": ["algorithm.kd.estimator=topk", "teacher.top_k=4"],
    "sparse3": ["algorithm.kd.estimator=sparse", "teacher.sparse_samples=3"],
}
PAYLOAD = {"topk4": 8 * 4 + 8, "sparse3": 12 * 3 + 4}  # bytes per token, before pickling overhead


def train(method: str, seed: int, steps: int, out: str) -> float:
    args = ["train", "configs/demo.yaml", f"run.output_dir={out}", f"run.steps={steps}", f"run.seed={seed}",
            "run.eval_every=0", "algorithm.pg_coef=0", "algorithm.kd.divergence=forward_kl", *METHODS[method]]
    print("$ rayskd " + " ".join(args), flush=True)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "rayskd", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    if r.returncode != 0:
        print(r.stdout[-3000:], file=sys.stderr)
        raise SystemExit(f"{method} seed {seed} failed ({r.returncode})")
    return time.time() - t0


def judge(model_path: str, teacher, tok, rows) -> dict:
    """Exact divergences to the teacher and calibration, teacher-forced on the references."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    fkl = rkl = ent = 0.0
    conf, correct = [], []
    n = 0
    with torch.no_grad():
        for row in rows:
            prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
            answer = tok(row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([prompt + answer])
            at = slice(len(prompt) - 1, len(prompt) + len(answer) - 1)  # the logits that predict the answer
            ls = torch.log_softmax(model(ids).logits[0, at, :len(tok)].double(), -1)
            lt = torch.log_softmax(teacher(ids).logits[0, at, :len(tok)].double(), -1)
            fkl += float((lt.exp() * (lt - ls)).sum())
            rkl += float((ls.exp() * (ls - lt)).sum())
            ent += float(-(ls.exp() * ls).sum())
            top = ls.exp().max(-1)
            conf += top.values.tolist()
            correct += (top.indices == torch.tensor(answer)).double().tolist()
            n += len(answer)
    bins = [[] for _ in range(10)]
    for c, k in zip(conf, correct):
        bins[min(int(c * 10), 9)].append((c, k))
    ece = sum(abs(sum(c for c, _ in b) - sum(k for _, k in b)) for b in bins if b) / n
    return {"forward_kl": fkl / n, "reverse_kl": rkl / n, "entropy": ent / n, "ece": ece,
            "token_accuracy": sum(correct) / n, "confidence": sum(conf) / n, "tokens": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-rows", type=int, default=400)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "sparse_calibration.json"))
    a = p.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    assets = os.path.join(ROOT, "demo_assets")
    tok = AutoTokenizer.from_pretrained(os.path.join(assets, "student"))
    teacher = AutoModelForCausalLM.from_pretrained(os.path.join(assets, "teacher"), dtype=torch.float32).eval()
    with open(os.path.join(assets, "eval.jsonl")) as f:
        rows = [json.loads(line) for line in f][:a.eval_rows]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = {"date": time.strftime("%Y-%m-%d"), "steps": a.steps, "seeds": a.seeds, "eval_rows": len(rows),
              "objective": "distillation alone (pg_coef=0), forward KL, the demo's config",
              "payload_bytes_per_token": PAYLOAD,
              "teacher": judge(os.path.join(assets, "teacher"), teacher, tok, rows),
              "initial_student": judge(os.path.join(assets, "student"), teacher, tok, rows), "methods": {}}
    for method in METHODS:
        runs = []
        for seed in range(a.seeds):
            out = os.path.join(ROOT, "runs", f"sparse-{stamp}", f"{method}-seed{seed}")
            seconds = train(method, seed, a.steps, out)
            runs.append({"seed": seed, "train_s": round(seconds, 1), **judge(os.path.join(out, "final"), teacher, tok, rows)})
            print(f"  {method} seed {seed}: {runs[-1]}", flush=True)
        result["methods"][method] = {"runs": runs, "mean": {k: statistics.mean(r[k] for r in runs)
                                                            for k in runs[0] if k not in ("seed", "tokens")}}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    for name, m in [("teacher", result["teacher"]), ("initial student", result["initial_student"]),
                    *((k, v["mean"]) for k, v in result["methods"].items())]:
        print(f"{name:16s} fKL {m['forward_kl']:.4f} rKL {m['reverse_kl']:.4f} entropy {m['entropy']:.4f} "
              f"ECE {m['ece']:.4f} acc {m['token_accuracy']:.4f} conf {m['confidence']:.4f}")


if __name__ == "__main__":
    main()
