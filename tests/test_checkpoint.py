import os

from rayskd import checkpoint as ck


def make(run, step, complete=True):
    tmp = ck.staging_dir(str(run), step)
    open(os.path.join(tmp, "model.safetensors"), "w").write("x")
    if complete:
        return ck.commit(str(run), step, {"step": step}, keep=2)
    return tmp


def test_commit_latest_and_prune(tmp_path):
    assert ck.latest(str(tmp_path)) is None
    for s in (1, 2, 3):
        make(tmp_path, s)
    assert [s for s, _ in ck.complete_checkpoints(str(tmp_path))] == [2, 3]
    step, path = ck.latest(str(tmp_path))
    assert step == 3 and ck.load_trainer_state(path) == {"step": 3}


def test_an_old_checkpoint_cut_short_in_deletion_leaves_no_step_directory(tmp_path, monkeypatch):
    """Pruning renames before it deletes: a deletion cut short (the run directory moved away mid-
    rmtree, found by test_run_dir) leaves a .tmp the next commit removes, never an empty step_N."""
    import shutil

    make(tmp_path, 1)
    make(tmp_path, 2)

    def cut_short(path, ignore_errors=False):  # the files go, the directory stays
        for root, _, files in os.walk(path):
            for name in files:
                os.remove(os.path.join(root, name))

    monkeypatch.setattr(shutil, "rmtree", cut_short)
    make(tmp_path, 3)  # prunes step 1
    names = sorted(os.listdir(ck.checkpoints_dir(str(tmp_path))))
    assert names == ["step_000001.tmp", "step_000002", "step_000003"], names
    monkeypatch.undo()
    make(tmp_path, 4)
    assert sorted(os.listdir(ck.checkpoints_dir(str(tmp_path)))) == ["step_000003", "step_000004"]


def test_partial_write_is_never_taken(tmp_path):
    make(tmp_path, 1)
    make(tmp_path, 2, complete=False)  # a crash while writing step 2
    assert ck.latest(str(tmp_path))[0] == 1
    # a directory renamed without its marker does not count either
    os.makedirs(os.path.join(ck.checkpoints_dir(str(tmp_path)), "step_000005"))
    assert ck.latest(str(tmp_path))[0] == 1
    make(tmp_path, 3)  # the next commit clears the stale staging directory
    assert not os.path.exists(os.path.join(ck.checkpoints_dir(str(tmp_path)), "step_000002.tmp"))


def test_damaged_checkpoints_are_passed_over_for_the_newest_intact_one(tmp_path):
    for s in (1, 2, 3, 4):
        tmp = ck.staging_dir(str(tmp_path), s)
        open(os.path.join(tmp, "model.safetensors"), "wb").write(bytes(range(256)) * 4)
        open(os.path.join(tmp, "learner_rank1.pt"), "wb").write(b"rank one")
        ck.commit(str(tmp_path), s, {"step": s}, keep=4)
    paths = dict(ck.complete_checkpoints(str(tmp_path)))
    assert ck.newest_intact(str(tmp_path)) == ((4, paths[4]), [])
    with open(os.path.join(paths[4], "model.safetensors"), "r+b") as f:
        f.truncate(100)  # truncated
    os.remove(os.path.join(paths[3], "learner_rank1.pt"))  # a rank file missing
    with open(os.path.join(paths[2], "model.safetensors"), "r+b") as f:
        f.write(b"\xff")  # same size, other bytes
    found, damaged = ck.newest_intact(str(tmp_path))
    assert found == (1, paths[1])
    assert damaged == [(paths[4], "model.safetensors has 100 bytes, 1024 were written"),
                       (paths[3], "learner_rank1.pt is missing"),
                       (paths[2], "model.safetensors does not match its checksum")]
