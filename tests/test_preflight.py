"""Checks that run before any actor starts (exit status 2, one line): models whose logits
are not hidden @ lm_head^T, and rehearsal data made at another temperature or dtype."""
import json
import os

import pytest
from test_system import rayskd

from rayskd.preflight import UsageError, check_logit_head, check_tensor_parallel

DEMO = os.path.abspath("configs/demo.yaml")


def tiny(kind):
    """A tiny random config of an architecture whose logits are not h @ W^T (or are)."""
    from transformers import CohereConfig, Gemma2Config, PhiConfig, Qwen2Config

    small = dict(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                 num_key_value_heads=1)
    return {"gemma2": Gemma2Config(final_logit_softcapping=30.0, head_dim=64, **small),
            "cohere": CohereConfig(logit_scale=0.0625, **small),
            "phi": PhiConfig(**small),  # its lm_head has a bias
            "qwen2": Qwen2Config(**small)}[kind]


def save_tiny(kind, path, weights):
    """The config alone (the check builds the model on the meta device) or a whole checkpoint
    (the check reads the safetensors headers)."""
    if not weights:
        tiny(kind).save_pretrained(path)
        return
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny(kind)).save_pretrained(path, safe_serialization=True)


@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("kind,what", [("gemma2", "soft-caps"), ("cohere", "multiplies its logits"),
                                       ("phi", "bias on its LM head")])
def test_models_whose_logits_are_not_a_linear_head_are_refused(kind, what, weights, tmp_path):
    """Issue 8.8: refused with what the model does, until rayskd supports it."""
    save_tiny(kind, tmp_path, weights)
    with pytest.raises(UsageError, match=what):
        check_logit_head("student.path", str(tmp_path))


@pytest.mark.parametrize("weights", [False, True])
def test_a_plain_linear_head_passes(weights, tmp_path):
    save_tiny("qwen2", tmp_path, weights)
    check_logit_head("teacher.path", str(tmp_path))


def test_the_head_bias_is_read_from_the_checkpoint_without_building_the_model(tmp_path, monkeypatch):
    """With safetensors weights the check reads tensor names and shapes only: the modelling
    code (seconds of import before anything can start) is not needed."""
    import rayskd.preflight as preflight

    save_tiny("phi", tmp_path, weights=True)
    monkeypatch.setattr(preflight, "meta_head_has_bias", lambda config: pytest.fail("built the model"))
    with pytest.raises(UsageError, match="bias on its LM head"):
        check_logit_head("student.path", str(tmp_path))


@pytest.mark.parametrize("change,tp,teacher,what", [
    (dict(num_attention_heads=3, num_key_value_heads=3, hidden_size=96), 2, False, "num_attention_heads=3"),
    (dict(vocab_size=33), 2, True, "33 rows"),
    (dict(), 4, True, None),  # 32 rows, 4 heads: splits
    (dict(vocab_size=33), 1, True, None),  # one rank: nothing to split
])
def test_tensor_parallel_needs_heads_and_head_rows_that_split(change, tp, teacher, what, tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(**{**dict(vocab_size=32, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=4), **change}).save_pretrained(tmp_path)
    if what is None:
        check_tensor_parallel("teacher.tensor_parallel_size", str(tmp_path), tp, teacher)
    else:
        with pytest.raises(UsageError, match=what):
            check_tensor_parallel("teacher.tensor_parallel_size", str(tmp_path), tp, teacher)


def test_cli_refuses_a_soft_capped_teacher_with_exit_2(demo_assets, tmp_path):
    tiny("gemma2").save_pretrained(tmp_path)
    r = rayskd("train", DEMO, f"teacher.path={tmp_path}")
    assert r.returncode == 2 and "teacher.path" in r.stderr and "soft-caps" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("route,what", [({"domain": "nope"}, "row 2 is 'nope'"), ({}, "row 2 has no such field")])
def test_a_routed_row_that_names_no_teacher_exits_2(demo_assets, tmp_path, route, what):
    """teacher.route_field: every training row must name one of the teachers, checked before
    anything starts; a soft-capped second teacher is refused like the first."""
    assets, _ = demo_assets
    rows = [{"prompt": "12+34=", "answer": "046", "domain": "plain"}, {"prompt": "15+37=", "answer": "052", **route}]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    routed = ["teacher.route_field=domain", "teacher.names=[plain,carry]", f"teacher.others=[{assets}/student]",
              "algorithm.prompts_per_step=2", f"teacher.path={assets}/teacher", f"student.path={assets}/student"]
    r = rayskd("train", DEMO, f"data.train_path={data}", *routed)
    assert r.returncode == 2 and "teacher.route_field=domain" in r.stderr and what in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    if not route:  # (once) another teacher is checked like the first: a soft-capped one is refused
        tiny("gemma2").save_pretrained(tmp_path / "capped")
        r = rayskd("train", DEMO, *routed[:2], f"teacher.others=[{tmp_path}/capped]")
        assert r.returncode == 2 and "teacher.others" in r.stderr and "soft-caps" in r.stderr, r.stderr


def write_rehearsal(path, meta):
    path.write_text(json.dumps({"uid": 0, "prompt_ids": [0, 1], "response_ids": [2, 12], "ref_logp": [-0.1, -0.2]})
                    + "\n")
    if meta is not None:
        (path.parent / (path.name + ".meta.json")).write_text(json.dumps(meta))


@pytest.mark.parametrize("meta,override,message", [
    ({"temperature": 0.7, "dtype": "float32"}, [], "temperature=0.7"),
    ({"temperature": 1.0, "dtype": "float32"}, ["learner.bf16=true"], "dtype=float32"),
    (None, [], "run `rayskd presample` again"),
])
def test_rehearsal_data_made_differently_is_refused(demo_assets, tmp_path, meta, override, message):
    """Issue 8.8: reference log-probs made at another temperature or in another dtype than
    the learner's would make u != 1 at the start: exit 2 before anything starts."""
    data = tmp_path / "rehearsal.jsonl"
    write_rehearsal(data, meta)
    r = rayskd("train", DEMO, "algorithm.rehearsal.coef=0.1", f"algorithm.rehearsal.data_path={data}", *override)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "Started a local Ray instance" not in r.stderr + r.stdout
