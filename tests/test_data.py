import json

import pytest

from rayskd.data.dataset import DataError, PromptDataset, PromptSampler, read_rows


class CharTok:
    """One token per character; a list of texts in, a list of id lists out (as a Hugging Face tokenizer)."""
    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, list):
            return {"input_ids": [[ord(c) for c in t] for t in text]}
        return {"input_ids": [ord(c) for c in text]}


def test_read_rows_errors_and_malformed_rows(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"q": "1+1=", "a": "2"}\n\nnot json\n{"q": "2+2="}\n{"q": "", "a": "1"}\n{"q": 5, "a": "1"}\n')
    rows, skipped = read_rows(str(p), "q", "a")
    assert rows == [{"prompt": "1+1=", "answer": "2"}] and skipped == 4  # bad JSON, no answer, empty, not text
    p.write_text('{"q": "1+1="}\nnot json\n')
    with pytest.raises(DataError, match="no usable rows.*2 malformed; first: .*:1: missing key 'a'"):
        read_rows(str(p), "q", "a")
    p.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_rows(str(p), "q", "a")
    with pytest.raises(DataError, match="not found"):
        read_rows(str(tmp_path / "nope.jsonl"), "q", "a")


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
