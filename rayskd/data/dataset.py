"""Prompt datasets (JSONL, JSON, Parquet, CSV, saved `datasets` directories; text or chat
prompts) and a prompt sampler whose position is part of the run's state."""
from __future__ import annotations

import json
import os

import torch


class DataError(ValueError):
    pass


# file formats read through the `datasets` library (JSONL is read line by line here, so that one
# malformed line is skipped and counted instead of failing the whole file; CSV too, as text)
TABLE_FORMATS = {".json": "json", ".parquet": "parquet"}


def field(record, key: str):
    """`record[key]`, where `key` may be a dotted path into nested fields
    (`reward_model.ground_truth`, verl's layout). KeyError when it is not there."""
    if isinstance(record, dict) and key in record:
        return record[key]
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def _records(path: str):
    """(where, record) for every row of a JSONL, JSON, Parquet or CSV file or a saved dataset
    directory; record None for a line that is not valid JSON."""
    if os.path.isdir(path):
        from datasets import DatasetDict, load_from_disk

        try:
            ds = load_from_disk(path)
        except Exception as e:
            raise DataError(f"{path}: not a saved dataset ({str(e).splitlines()[0]})") from None
        if isinstance(ds, DatasetDict):
            if "train" not in ds and len(ds) != 1:
                raise DataError(f"{path}: a dataset with splits {sorted(ds)}; point at one split's directory")
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        yield from ((f"{path}[{i}]", r) for i, r in enumerate(ds))
        return
    if not os.path.isfile(path):
        raise DataError(f"dataset not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":  # read here: `datasets` infers types, and an answer "052" would become 52
        import csv

        with open(path, newline="") as f:
            yield from ((f"{path}:{n}", row) for n, row in enumerate(csv.DictReader(f), 2))
        return
    if ext in TABLE_FORMATS:
        from datasets import load_dataset

        try:
            ds = load_dataset(TABLE_FORMATS[ext], data_files=path, split="train")
        except Exception as e:
            raise DataError(f"{path}: cannot read it as {TABLE_FORMATS[ext]} ({str(e).splitlines()[0]})") from None
        yield from ((f"{path}[{i}]", r) for i, r in enumerate(ds))
        return
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{path}:{n}", json.loads(line)
                except json.JSONDecodeError:
                    yield f"{path}:{n}", None


def _prompt(value):
    """A usable prompt: a non-empty string, or a non-empty list of {role, content} messages."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return None


def read_rows(path: str, prompt_key: str, answer_key: str, route_key: str = "") -> tuple[list[dict], int]:
    """Rows {"prompt": str or messages, "answer": str} from a file or saved dataset directory
    (see _records), and how many rows were skipped as malformed (not JSON, a field missing or
    empty, a prompt that is neither text nor messages). None usable: DataError. `route_key`:
    also {"route": str}, the field that names a row's teacher (teacher.route_field)."""
    rows, skipped, first = [], 0, None
    for where, record in _records(path):
        try:
            prompt, answer = _prompt(field(record, prompt_key)), field(record, answer_key)
            problem = ("not valid JSON" if record is None else "the prompt is neither text nor {role, content} "
                       "messages" if prompt is None else "the answer is empty" if answer is None or not str(answer).strip() else None)
        except KeyError as e:
            problem = f"missing key {e.args[0]!r}"
        if problem is not None:
            skipped += 1
            first = first or f"{where}: {problem}"
            continue
        rows.append({"prompt": prompt, "answer": str(answer)})
        if route_key:  # checked against the teachers at start (preflight)
            try:
                rows[-1]["route"] = str(field(record, route_key))
            except KeyError:
                rows[-1]["route"] = None
    if not rows:
        raise DataError(f"no usable rows in {path}" + (f" ({skipped} malformed; first: {first}; set "
                                                        f"data.prompt_key / data.answer_key)" if skipped else
                                                        " (it is empty)"))
    return rows, skipped


TOKENIZE_BATCH = 4096  # prompts per tokenizer call


class PromptDataset:
    """Tokenised prompts. A prompt of chat messages (or a text prompt, with `chat_template`)
    goes through the tokenizer's chat template with the generation prompt, after
    `system_prompt` when the messages have no system message; the rendered text is what the
    reward sees. Prompts longer than max_prompt_tokens (or empty) are skipped and counted."""

    def __init__(self, rows: list[dict], tokenizer, max_prompt_tokens: int, chat_template: bool = False,
                 system_prompt: str | None = None, skipped_malformed: int = 0):
        self.rows, self.prompt_ids, self.skipped_too_long = [], [], 0
        self.skipped_malformed = skipped_malformed
        self.chat = chat_template or any(not isinstance(row["prompt"], str) for row in rows)  # templated
        texts = [render_prompt(tokenizer, row["prompt"], chat_template, system_prompt) for row in rows]
        # in batches: a fast tokenizer's batch call is ~5x a call per prompt
        tokenised = [ids for start in range(0, len(texts), TOKENIZE_BATCH)
                     for ids in tokenizer(texts[start:start + TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]]
        for row, text, ids in zip(rows, texts, tokenised):
            if len(ids) > max_prompt_tokens or len(ids) == 0:
                self.skipped_too_long += 1
                continue
            self.rows.append({"prompt": text, **{k: v for k, v in row.items() if k != "prompt"}})
            self.prompt_ids.append(list(ids))

    def __len__(self) -> int:
        return len(self.rows)


def render_prompt(tokenizer, prompt, chat_template: bool, system_prompt: str | None) -> str:
    """The text a prompt is fed to the model as (see PromptDataset)."""
    if isinstance(prompt, str) and not chat_template:
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the prompts are chat messages (or data.chat_template=true) but the student's tokenizer "
                        "has no chat template")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class PromptSampler:
    """Walks the dataset in a seeded random order, epoch after epoch. State is (epoch,
    position): restoring it continues exactly where a run stopped."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def next(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
            take = min(count - len(out), self.size - self.position)
            out += self._order(self.epoch)[self.position:self.position + take]
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise DataError(f"the dataset changed size since the checkpoint ({state['size']} -> {self.size} prompts)")
        self.epoch, self.position = state["epoch"], state["position"]


def data_fingerprint(dataset: PromptDataset, tokenizer_dir: str) -> dict:
    """What a run trains on, to know it again at a resume: the rows as the model sees them
    (prompt token ids and answer), in order and as a set, their count, and the tokenizer files."""
    import hashlib
    import json
    import os

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    rows = [sha(json.dumps([ids, row["answer"], *([row["route"]] if "route" in row else [])]))
            for ids, row in zip(dataset.prompt_ids, dataset.rows)]
    tokenizer = hashlib.sha256()
    for name in sorted(os.listdir(tokenizer_dir)):
        if name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            with open(os.path.join(tokenizer_dir, name), "rb") as f:
                tokenizer.update(name.encode() + f.read())
    return {"rows": len(rows), "ordered": sha("".join(rows)), "content": sha("".join(sorted(rows))),
            "tokenizer": tokenizer.hexdigest()}


def data_changes(saved: dict, now: dict) -> str | None:
    """What differs between two `data_fingerprint`s, in words (None: nothing)."""
    if saved["tokenizer"] != now["tokenizer"]:
        return "the student's tokenizer changed"
    if saved["rows"] != now["rows"]:
        return f"the training data had {saved['rows']} usable rows, it has {now['rows']} now"
    if saved["content"] != now["content"]:
        return "the training data holds other rows (as many as before)"
    if saved["ordered"] != now["ordered"]:
        return "the training data holds the same rows in another order"
    return None
