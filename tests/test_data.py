import json

import pytest

from rayskd.data.dataset import DataError, PromptDataset, PromptSampler, read_jsonl


class CharTok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_read_jsonl_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"q": "1+1=", "a": "2"}\n\nnot json\n')
    with pytest.raises(DataError, match=":3: not valid JSON"):
        read_jsonl(str(p), "q", "a")
    p.write_text('{"q": "1+1="}\n')
    with pytest.raises(DataError, match="missing key 'a'"):
        read_jsonl(str(p), "q", "a")
    p.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_jsonl(str(p), "q", "a")
    with pytest.raises(DataError, match="not found"):
        read_jsonl(str(tmp_path / "nope.jsonl"), "q", "a")


def test_over_long_prompts_are_skipped_and_counted():
    rows = [{"prompt": "x" * n, "answer": "1"} for n in (3, 10, 5, 0)]
    ds = PromptDataset(rows, CharTok(), max_prompt_tokens=5)
    assert len(ds) == 2 and ds.skipped_too_long == 2


def test_sampler_epochs_and_exact_state():
    s = PromptSampler(10, seed=3)
    first = s.next(7) + s.next(7)  # crosses an epoch boundary
    assert sorted(first[:10]) == list(range(10)) and s.epoch == 1
    state = json.loads(json.dumps(s.state_dict()))
    after = s.next(9)
    t = PromptSampler(10, seed=3)
    t.load_state_dict(state)
    assert t.next(9) == after
