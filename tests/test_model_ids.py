"""Issue 13.5: student.path / teacher.path as Hugging Face model ids, resolved through the local
cache (offline, as scripts/_env.sh runs: HF_HUB_OFFLINE=1) to the cached snapshot; a model id
in no cache is exit 2 naming the key, before anything starts."""
import os
import shutil

from rayskd.config import load_config
from test_system import rayskd

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_with_demo_models(assets: str, cache: str) -> None:
    """A Hugging Face hub cache holding the demo models as rayskd-test/demo-student and
    rayskd-test/demo-teacher, laid out as huggingface_hub writes it."""
    for role in ("student", "teacher"):
        repo = os.path.join(cache, f"models--rayskd-test--demo-{role}")
        shutil.copytree(os.path.join(assets, role), os.path.join(repo, "snapshots", COMMIT))
        os.makedirs(os.path.join(repo, "refs"))
        with open(os.path.join(repo, "refs", "main"), "w") as f:
            f.write(COMMIT)


def test_model_ids_are_kept_and_paths_made_absolute():
    cfg = load_config("configs/demo.yaml", ["student.path=Qwen/Qwen2.5-1.5B-Instruct"])
    assert cfg.student.path == "Qwen/Qwen2.5-1.5B-Instruct"
    assert cfg.teacher.path == os.path.abspath("demo_assets/teacher")  # exists here: a path


def test_a_model_id_in_no_cache_is_exit_2_before_anything_starts(demo_assets, tmp_path, monkeypatch):
    """(A run from model ids in the cache: tests/test_data_formats.py, its Parquet run.)"""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = rayskd("train", "configs/demo.yaml", f"run.output_dir={tmp_path / 'other'}",
               "student.path=rayskd-test/not-cached")
    assert r.returncode == 2 and "student.path: rayskd-test/not-cached is neither a local directory" in r.stderr
    assert "Started a local Ray instance" not in r.stdout + r.stderr
