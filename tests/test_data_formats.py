"""Issue 13.1-13.2: the same rows from JSONL, JSON, Parquet, CSV and a saved dataset directory;
nested answer fields and the verl and TRL prompt layouts unchanged; chat prompts through the
student's chat template (a system prompt, text prompts with data.chat_template); a teacher
whose template renders a conversation differently is refused."""
import json
import os

import pytest

from rayskd.data.dataset import DataError, PromptDataset, read_rows
from rayskd.preflight import UsageError, check_same_template

ROWS = [{"q": f"{a:02d}+{b:02d}=", "a": f"{a + b:03d}"} for a, b in ((7, 45), (12, 30), (99, 1))]
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}[{{ m['content'] }}]{% else %}"
            "{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}={% endif %}")


def write(path, rows):
    import datasets

    ext = os.path.splitext(str(path))[1]
    if ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif ext == ".json":
        path.write_text(json.dumps(rows))
    else:
        ds = datasets.Dataset.from_list(rows)
        {".parquet": ds.to_parquet, ".csv": ds.to_csv, "": ds.save_to_disk}[ext](str(path))
    return str(path)


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.parquet", "d.csv", "saved"])
def test_every_format_gives_the_same_rows(tmp_path, name):
    rows, skipped = read_rows(write(tmp_path / name, ROWS), "q", "a")
    assert rows == [{"prompt": r["q"], "answer": r["a"]} for r in ROWS] and skipped == 0


def test_verl_and_trl_layouts_unchanged(tmp_path):
    verl = [{"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": r["q"]}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": r["a"]}, "extra_info": {"index": i}}
            for i, r in enumerate(ROWS)]
    rows, _ = read_rows(write(tmp_path / "train.parquet", verl), "prompt", "reward_model.ground_truth")
    assert rows[0] == {"prompt": [{"role": "user", "content": "07+45="}], "answer": "052"}
    trl = [{"prompt": [{"role": "system", "content": "add"}, {"role": "user", "content": r["q"]}], "solution": r["a"]}
           for r in ROWS]
    rows, _ = read_rows(write(tmp_path / "trl.jsonl", trl), "prompt", "solution")
    assert rows[2]["prompt"][1] == {"role": "user", "content": "99+01="} and rows[2]["answer"] == "100"
    with pytest.raises(DataError, match="missing key 'reward_model.truth'"):
        read_rows(str(tmp_path / "train.parquet"), "prompt", "reward_model.truth")


@pytest.fixture
def chat_tokenizer(demo_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(demo_assets[0], "student"))
    tok.chat_template = TEMPLATE
    return tok


def test_chat_prompts_go_through_the_template(chat_tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "07+45"}], "answer": "052"}, {"prompt": "12+30", "answer": "042"}]
    ds = PromptDataset(rows, chat_tokenizer, 32, chat_template=True, system_prompt="s")
    assert [r["prompt"] for r in ds.rows] == ["[s]07+45=", "[s]12+30="] and ds.chat
    assert ds.prompt_ids[0] == chat_tokenizer("[s]07+45=", add_special_tokens=False)["input_ids"]
    plain = PromptDataset(rows[1:], chat_tokenizer, 32)
    assert plain.rows[0]["prompt"] == "12+30" and not plain.chat  # text prompts as they are, by default
    chat_tokenizer.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        PromptDataset(rows[:1], chat_tokenizer, 32)


def test_a_teacher_template_that_renders_differently_is_refused(chat_tokenizer, demo_assets):
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(os.path.join(demo_assets[0], "teacher"))
    teacher.chat_template = TEMPLATE
    check_same_template(chat_tokenizer, teacher, "s")  # the same rendering: fine
    teacher.chat_template = TEMPLATE.replace("[{{", "<{{").replace("}}]", "}}>")
    with pytest.raises(UsageError, match="renders a conversation differently.*allow_template_mismatch"):
        check_same_template(chat_tokenizer, teacher, "s")


@pytest.mark.slow
def test_two_steps_on_a_parquet_dataset_of_chat_messages(demo_assets, tmp_path, monkeypatch, no_leftover_engines):
    """The demo's rows as chat messages in Parquet (verl's layout), through a chat template on
    the demo student and teacher that renders them as the plain prompts: the prompts tokenize to
    the very same sequences as the plain JSONL rows (checked here, as the run loads them), and a
    run trains on them, sampling the prompts a plain run would. Its models are named by Hugging
    Face ids, resolved through the local cache to the cached snapshots (issue 13.5:
    tests/test_model_ids.py), which the run's config.yaml keeps."""
    import shutil

    from transformers import AutoTokenizer

    from rayskd.config import load_config
    from rayskd.data.dataset import PromptSampler
    from rayskd.preflight import load_split
    from test_model_ids import COMMIT, cache_with_demo_models
    from test_system import FAST, metrics, rayskd

    assets = demo_assets[0]
    models = tmp_path / "models"
    for role in ("student", "teacher"):
        shutil.copytree(os.path.join(assets, role), models / role)
        tok = AutoTokenizer.from_pretrained(str(models / role))
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
        tok.save_pretrained(str(models / role))
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in open(os.path.join(assets, f"{split}.jsonl"))]
        write(tmp_path / f"{split}.parquet", [{"prompt": [{"role": "user", "content": r["prompt"].removesuffix("=")}],
                                               "reward_model": {"ground_truth": r["answer"]}} for r in rows])
    chat_args = [f"data.train_path={tmp_path / 'train.parquet'}", f"data.eval_path={tmp_path / 'eval.parquet'}",
                 "data.answer_key=reward_model.ground_truth"]
    chat_cfg = load_config("configs/demo.yaml", chat_args)
    chat = load_split(chat_cfg, chat_cfg.data.train_path, AutoTokenizer.from_pretrained(str(models / "student")))
    plain_cfg = load_config("configs/demo.yaml", [])
    plain = load_split(plain_cfg, plain_cfg.data.train_path, AutoTokenizer.from_pretrained(f"{assets}/student"))
    assert chat.chat and not plain.chat and len(chat) == len(plain)
    assert chat.prompt_ids == plain.prompt_ids  # the same token sequences
    assert [r["answer"] for r in chat.rows] == [r["answer"] for r in plain.rows]

    cache = str(tmp_path / "hub")
    cache_with_demo_models(str(models), cache)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    r = rayskd("train", "configs/demo.yaml", "run.steps=2", "learner.world_size=1", *FAST, f"run.output_dir={run}",
               "student.path=rayskd-test/demo-student", "teacher.path=rayskd-test/demo-teacher", *chat_args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    config = (run / "config.yaml").read_text()
    assert os.path.join(cache, "models--rayskd-test--demo-student", "snapshots", COMMIT) in config
    sampler = PromptSampler(len(plain), plain_cfg.run.seed)
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2]
    for m in rows:
        assert m["prompt_uids"] == sorted(sampler.next(plain_cfg.algorithm.prompts_per_step))
        assert m["kd_divergence"] > 0 and m["skipped_update"] is False and m["sampler_mismatch_max"] < 1e-3
        assert 0.0 <= m["reward_mean"] <= 1.0 and m["reward_errors"] == 0  # the nested answers were read
