"""The built-in demo assets: task files, a tokenizer AutoTokenizer round-trips, two Qwen2
checkpoints, and a teacher that clearly beats the student."""
import json
import os
import time

import pytest

pytestmark = pytest.mark.slow


def test_demo_assets(demo_assets):
    path, report = demo_assets
    for name in ("train.jsonl", "eval.jsonl", "report.json", "teacher/config.json", "student/config.json",
                 "teacher/model.safetensors", "student/tokenizer.json"):
        assert os.path.exists(os.path.join(path, name)), name
    with open(os.path.join(path, "report.json")) as f:
        on_disk = json.load(f)
    assert on_disk["teacher_accuracy"] >= 0.9
    assert on_disk["student_accuracy"] < 0.3
    row = json.loads(open(os.path.join(path, "train.jsonl")).readline())
    assert set(row) == {"prompt", "answer"}


def test_tokenizer_round_trips_through_autotokenizer(demo_assets):
    from transformers import AutoConfig, AutoTokenizer

    path, _ = demo_assets
    for model in ("teacher", "student"):
        tok = AutoTokenizer.from_pretrained(os.path.join(path, model))
        ids = tok("07+45=052", add_special_tokens=False)["input_ids"]
        assert len(ids) == 9 and tok.decode(ids) == "07+45=052"
        cfg = AutoConfig.from_pretrained(os.path.join(path, model))
        assert cfg.model_type == "qwen2" and cfg.hidden_size // cfg.num_attention_heads == 64


def test_second_call_is_cached(demo_assets):
    from rayskd.data.demo import prepare_demo

    path, report = demo_assets
    t0 = time.time()
    assert prepare_demo(path, seed=0, log=lambda m: None) == report
    assert time.time() - t0 < 5


def sft_weights(tmp_path, caller_dtype, pinned=True):
    """A few SFT steps of the demo student as prepare_demo runs them, from a caller whose
    default dtype is `caller_dtype`."""
    import contextlib

    import torch

    from rayskd.data import demo

    before = torch.get_default_dtype()
    torch.set_default_dtype(caller_dtype)
    try:
        with demo.pinned_numerics() if pinned else contextlib.nullcontext():
            tok = demo.build_tokenizer(str(tmp_path / "tok"))
            rows = demo.make_task(0, 20, 10)[0][:64]
            model = demo.make_model(demo.STUDENT, len(tok), tok.eos_token_id, 0)
            demo.sft(model, tok, rows, 3, 16, 3e-3, 0, lambda m: None, "student", 0.1)
        assert torch.get_default_dtype() == caller_dtype  # restored
    finally:
        torch.set_default_dtype(before)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_demo_models_do_not_depend_on_the_callers_default_dtype(tmp_path):
    """The loss tests set float64 as the default dtype: the demo prepared under pytest came
    out different from the CLI's (student 0.083 instead of 0.018)."""
    import torch

    a, b = sft_weights(tmp_path, torch.float32), sft_weights(tmp_path, torch.float64)
    assert all(torch.equal(a[k], b[k]) for k in a)
