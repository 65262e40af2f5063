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
