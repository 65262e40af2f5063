"""The built-in demos: a verifiable task, a character-level tokenizer and two
Qwen2-architecture models (teacher, student) trained here by supervised fine-tuning.

Three tasks (`rayskd prepare-demo --task NAME`): `arith`, two-digit addition with one right
answer (this module); `split`, writing a number as a carry-free sum with many right
answers (demo_split.py); and `gaps`, split with the KDRL paper's premise: a student that
rarely reaches a reward, a teacher that knows what it lacks but errs elsewhere (demo_gaps.py). No network, no model hub. Deterministic for a seed; cached by a
fingerprint of the recipe.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import time

import torch

DEMO_VERSION = 6
CHARS = "0123456789+="
EOS = "<|endoftext|>"
# head size 64 everywhere: vLLM's CPU attention refuses 16
TEACHER = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, intermediate_size=512,
               num_hidden_layers=2)
STUDENT = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, intermediate_size=256,
               num_hidden_layers=2)
# The teacher is trained to convergence. The student is 4x smaller; it learns the task, then
# picks up a systematic error (a short fine-tune on answers whose last digit is off by one),
# so it solves few held-out problems while the knowledge to fix that is within its reach.
# (An early-stopped student was tried first: from that point even plain SFT needs hundreds
# of updates, so no on-policy method shows a gain within a CPU demo's budget.)
RECIPE = dict(version=DEMO_VERSION, max_operand=99, n_eval=400, teacher=TEACHER, student=STUDENT,
              teacher_steps=700, teacher_lr=2e-3, student_steps=400, student_lr=3e-3, batch_size=128,
              student_bias_steps=20, student_bias_lr=1e-3,
              # a teacher trained without smoothing puts log-probs of -20..-40 on wrong digits:
              # reverse-KL log-ratios that large make the distillation gradient mostly noise
              teacher_label_smoothing=0.1, student_label_smoothing=0.0)


def off_by_one(rows):
    """The student's systematic error: the last digit of every answer is one too high."""
    return [{"prompt": r["prompt"], "answer": r["answer"][:-1] + str((int(r["answer"][-1]) + 1) % 10)} for r in rows]


def make_task(seed: int, max_operand: int, n_eval: int):
    """All a+b problems with 0 <= a, b <= max_operand, split into train and held-out eval."""
    rows = [{"prompt": f"{a:02d}+{b:02d}=", "answer": f"{a + b:03d}"} for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(seed).shuffle(rows)
    return rows[n_eval:], rows[:n_eval]


def with_domain(rows):
    """The rows with a `domain` field: `carry` when the units digits carry, else `plain` (a
    field to route prompts to teachers by: teacher.route_field=domain)."""
    return [{**r, "domain": "carry" if int(r["prompt"][1]) + int(r["prompt"][4]) >= 10 else "plain"} for r in rows]


def build_tokenizer(out_dir: str):
    """Character-level tokenizer in the byte-level BPE form of Qwen2 (no merges), so that
    `AutoTokenizer` (which loads it as Qwen2Tokenizer next to a Qwen2 config) round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(out_dir)
    return fast


def make_model(arch: dict, vocab_size: int, eos_id: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, max_position_embeddings=64, eos_token_id=eos_id, bos_token_id=eos_id,
                      pad_token_id=eos_id, tie_word_embeddings=False, rope_theta=10000.0, torch_dtype="float32",
                      **arch)
    return Qwen2ForCausalLM(cfg).float()


def encode_batch(tok, rows, eos_id):
    """Right-padded prompt+answer+EOS with loss only on answer+EOS."""
    seqs, masks = [], []
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        a = tok(r["answer"], add_special_tokens=False)["input_ids"] + [eos_id]
        seqs.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    T = max(map(len, seqs))
    ids = torch.full((len(rows), T), eos_id)
    loss_mask = torch.zeros(len(rows), T)
    attn = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s)
        loss_mask[i, :len(m)] = torch.tensor(m, dtype=torch.float)
        attn[i, :len(s)] = 1
    return ids, attn, loss_mask


def sft(model, tok, rows, steps: int, batch_size: int, lr: float, seed: int, log=print, name="model",
        label_smoothing: float = 0.0):
    eos_id = tok.eos_token_id
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / max(steps, 1)))
    model.train()
    order = list(range(len(rows)))
    pos = len(order)
    t0 = time.time()
    for step in range(steps):
        if pos + batch_size > len(order):
            rng.shuffle(order)
            pos = 0
        batch = [rows[i] for i in order[pos:pos + batch_size]]
        pos += batch_size
        ids, attn, lmask = encode_batch(tok, batch, eos_id)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="none", label_smoothing=label_smoothing
                                                ).reshape(ids.shape[0], -1)
        loss = (nll * lmask[:, 1:]).sum() / lmask[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"[prepare-demo] {name} step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    return model


@torch.no_grad()
def decode(model, tok, prompts, max_new_tokens: int, samples: int = 0, batch_size: int = 512, seed: int = 0):
    """Greedy (samples=0) or `samples` sampled completions at temperature 1 per prompt
    (prompts left-padded, KV-cached generate), as text cut at EOS: a list per prompt."""
    eos_id = tok.eos_token_id
    torch.manual_seed(seed)
    out_texts = []
    for start in range(0, len(prompts), batch_size):
        enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch_size]]
        T = max(map(len, enc))
        ids = torch.full((len(enc), T), eos_id)
        attn = torch.zeros(len(enc), T, dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, T - len(e):] = torch.tensor(e)
            attn[i, T - len(e):] = 1
        n = max(samples, 1)
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                             do_sample=samples > 0, temperature=1.0 if samples else None, top_p=None, top_k=None,
                             num_return_sequences=n, eos_token_id=eos_id, pad_token_id=eos_id)
        texts = []
        for o in out[:, T:].tolist():
            texts.append(tok.decode(o[: o.index(eos_id)] if eos_id in o else o))
        out_texts += [texts[i * n:(i + 1) * n] for i in range(len(enc))]
    return out_texts


def exact(row, text: str) -> bool:
    return text.strip() == row["answer"]


def greedy_accuracy(model, tok, rows, max_new_tokens: int = 5, batch_size: int = 512, solves=exact) -> float:
    """Share of `rows` whose greedy completion `solves(row, text)` (exact match by default)."""
    texts = decode(model, tok, [r["prompt"] for r in rows], max_new_tokens, batch_size=batch_size)
    return sum(solves(r, t[0]) for r, t in zip(rows, texts)) / max(len(rows), 1)


def fingerprint(seed: int, recipe: dict = RECIPE, build=None) -> str:
    """What a prepared demo was made from: the seed, the recipe and the source of the module
    that builds it (a changed builder rebuilds; a recipe alone did not, and a stale cache once
    gave the split demo's comparison a student the code no longer makes)."""
    import inspect
    import sys

    source = inspect.getsource(sys.modules[build.__module__]) if build is not None else ""
    key = json.dumps({"seed": seed, **recipe}, sort_keys=True) + source
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def write_jsonl(path: str, rows) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def tasks() -> dict:
    """name -> (recipe, build(tmp_dir, fingerprint, seed, log) -> report)."""
    from . import demo_gaps, demo_split

    return {"arith": (RECIPE, _build), "split": (demo_split.RECIPE, demo_split.build),
            "gaps": (demo_gaps.RECIPE, demo_gaps.build)}


TASK_NAMES = ("arith", "split", "gaps")
DEFAULT_OUT = {"arith": "demo_assets", "split": "demo_assets_split", "gaps": "demo_assets_gaps"}


def prepare_demo(out_dir: str, seed: int = 0, log=print, task: str = "arith") -> dict:
    """Write DIR/{train,eval}.jsonl, DIR/teacher, DIR/student, DIR/report.json for `task`.
    Cached."""
    recipe, build = tasks()[task]
    out_dir = os.path.abspath(out_dir)
    report_path = os.path.join(out_dir, "report.json")
    fp = fingerprint(seed, recipe, build)
    if os.path.isfile(report_path):
        with open(report_path) as f:
            report = json.load(f)
        if report.get("fingerprint") == fp:
            log(f"[prepare-demo] cached: {out_dir} (teacher {report['teacher_accuracy']:.3f}, "
                f"student {report['student_accuracy']:.3f})")
            return report
    t0 = time.time()
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with pinned_numerics():
        report = build(tmp, fp, seed, log)
    report["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(tmp, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return report


@contextlib.contextmanager
def pinned_numerics():
    """A fixed thread count and default dtype keep the float reductions, and so the models,
    identical across machines and callers (a caller may have set float64 as the default
    dtype, as the loss tests do: the demo built under pytest differed from the CLI's)."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(2)
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)


def _build(tmp: str, fp: str, seed: int, log) -> dict:
    train, evals = make_task(seed, RECIPE["max_operand"], RECIPE["n_eval"])
    write_jsonl(os.path.join(tmp, "train.jsonl"), with_domain(train))
    write_jsonl(os.path.join(tmp, "eval.jsonl"), with_domain(evals))
    tok = build_tokenizer(os.path.join(tmp, "teacher"))
    build_tokenizer(os.path.join(tmp, "student"))
    report = {"fingerprint": fp, "seed": seed, "task": "aa+bb=ccc (two-digit operands, three-digit sum, zero-padded), exact match",
              "train_size": len(train), "eval_size": len(evals)}
    for name, arch, mseed in (("teacher", TEACHER, seed + 1), ("student", STUDENT, seed + 2)):
        steps = RECIPE[f"{name}_steps"]
        model = make_model(arch, len(tok), tok.eos_token_id, mseed)
        sft(model, tok, train, steps, RECIPE["batch_size"], RECIPE[f"{name}_lr"], mseed, log, name,
            RECIPE[f"{name}_label_smoothing"])
        if name == "student":
            report["student_accuracy_before_bias"] = greedy_accuracy(model, tok, evals)
            sft(model, tok, off_by_one(train), RECIPE["student_bias_steps"], RECIPE["batch_size"],
                RECIPE["student_bias_lr"], mseed + 1, log, "student (off-by-one fine-tune)")
        model.save_pretrained(os.path.join(tmp, name), safe_serialization=True)
        report[f"{name}_accuracy"] = greedy_accuracy(model, tok, evals)
        report[f"{name}_params"] = sum(p.numel() for p in model.parameters())
        report[f"{name}_sft_steps"] = steps
        log(f"[prepare-demo] {name}: held-out greedy accuracy {report[f'{name}_accuracy']:.3f}")
    return report
