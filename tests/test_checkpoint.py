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


def test_partial_write_is_never_taken(tmp_path):
    make(tmp_path, 1)
    make(tmp_path, 2, complete=False)  # a crash while writing step 2
    assert ck.latest(str(tmp_path))[0] == 1
    # a directory renamed without its marker does not count either
    os.makedirs(os.path.join(ck.checkpoints_dir(str(tmp_path)), "step_000005"))
    assert ck.latest(str(tmp_path))[0] == 1
    make(tmp_path, 3)  # the next commit clears the stale staging directory
    assert not os.path.exists(os.path.join(ck.checkpoints_dir(str(tmp_path)), "step_000002.tmp"))
