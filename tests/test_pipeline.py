"""The rollout pipeline's bookkeeping, with real Ray actors standing in for the engines and
teachers (orchestration only: no model is involved). Engines run their calls in order, as
vLLM engines in Ray actors do, and report the weights version they sampled with."""
import pytest
import ray
import torch

from rayskd.actors import TrainingError
from rayskd.batch import PromptBatch, RolloutShard, summarize
from rayskd.pipeline import RolloutPipeline

pytestmark = pytest.mark.slow

G = 2


@ray.remote
class FakeEngine:
    def __init__(self, lag: int = 0):
        self.version, self.lag, self.log = 0, lag, []

    def generate_with_summary(self, prompts, step):
        n = len(prompts.uids) * G
        self.log.append(("generate", step, self.version))
        shard = RolloutShard(torch.zeros(n, 1, dtype=torch.long), torch.ones(n, dtype=torch.long),
                             torch.zeros(n, 2, dtype=torch.long), torch.full((n,), 2), torch.zeros(n, 2),
                             torch.zeros(n), torch.zeros(n, dtype=torch.bool),
                             torch.tensor(prompts.uids).repeat_interleave(G), G, self.version)
        return shard, summarize(shard)

    def load_weights(self, flats, layout, version):
        self.version = max(0, version - self.lag)
        return version

    def calls(self):
        return self.log


@ray.remote
class FakeTeacher:
    def __init__(self):
        self.scored = 0

    def score(self, shard):
        self.scored += 1
        return shard.num_sequences

    def count(self):
        return self.scored


class Group:
    def __init__(self, actors):
        self.actors, self.n = actors, len(actors)

    def ready(self):  # as RolloutPool's: every engine serves the pushed weights
        return list(range(self.n))

    def generate(self, i, prompts, step):  # as RolloutPool's
        return self.actors[i].generate_with_summary.options(num_returns=2).remote(prompts, step)

    def call(self, method, *args):
        return [getattr(a, method).remote(*args) for a in self.actors]

    @property
    def workers(self):  # as ActorGroup's, for workers of one rank
        return self.n

    def call_worker(self, i, method, *args):
        return getattr(self.actors[i], method).remote(*args)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def prompts_for(step, per_step=8):
    uids = list(range(step * per_step, (step + 1) * per_step))
    return PromptBatch(uids, [[1]] * per_step, ["p"] * per_step, ["a"] * per_step)


def run(max_staleness, steps=6, engines=2, teachers=3, lag=0, requests=4):
    pool = Group([FakeEngine.remote(lag) for _ in range(engines)])
    teach = Group([FakeTeacher.remote() for _ in range(teachers)])
    asked, events = [], []

    def prompts(step):
        asked.append(step)
        return prompts_for(step)

    pipe = RolloutPipeline(pool, [teach], prompts, requests, max_staleness, steps, events.append)
    version, seen = 0, []
    for step in range(steps):
        batch = pipe.take(step, version)
        pipe.wait([ref for r in batch.requests for ref in r.score])
        assert sum(ray.get([ref for r in batch.requests for ref in r.score])) == 8 * G
        seen.append((step, batch.staleness(version), sorted({u for s in batch.summaries for u in s.uids})))
        version += 1  # the update, then the weight sync, queued behind whatever is generating
        ray.get([e.load_weights.remote(None, None, version) for e in pool.actors])
    return seen, asked, pool, teach, events


@pytest.mark.parametrize("k", [0, 1, 2])
def test_no_sample_exceeds_the_staleness_bound_and_overlap_is_real(k):
    seen, asked, pool, teach, _ = run(k)
    assert asked == list(range(6))  # every step's prompts drawn once, in order
    for step, staleness, uids in seen:
        assert uids == list(range(step * 8, (step + 1) * 8))  # no prompt lost or repeated
        assert max(staleness) <= k
        # step t is sampled with version max(0, t - k): the overlap is as deep as allowed
        assert set(staleness) == {min(step, k)}
    # requests spread over every engine and every teacher
    assert all(ray.get([e.calls.remote() for e in pool.actors]))
    assert all(c > 0 for c in ray.get([t.count.remote() for t in teach.actors]))


def test_an_engine_that_lags_too_far_is_refused_not_trained_on():
    with pytest.raises(TrainingError, match="max_staleness=1"):
        run(1, lag=3)


@ray.remote
class FakeLearner:
    def __init__(self):
        self.updates = 0

    def train_step(self):
        self.updates += 1

    def weight_buckets(self, layout):
        return f"weights after {self.updates} updates"


@ray.remote
class LoadingEngine:
    def __init__(self):
        self.loaded = []

    def load_weights(self, flats, layout, version):
        self.loaded.append((flats, version))
        return version

    def history(self):
        return self.loaded


def test_a_rejoining_engine_gets_the_pushed_version_not_newer_weights():
    from rayskd.weight_sync import ObjectStoreSync, WeightLayout

    learner, engines = Group([FakeLearner.remote()]), [LoadingEngine.remote() for _ in range(2)]
    sync = ObjectStoreSync(learner, WeightLayout("float32", ()))
    sync.rejoin(engines, 0)  # version 0: the initial weights, nothing to load
    ray.get(learner.actors[0].train_step.remote())
    assert ray.get(sync.push(engines, 1)) == [1, 1]
    ray.get(learner.actors[0].train_step.remote())  # the learner moves on (max_staleness >= 1) ...
    restarted = LoadingEngine.remote()
    sync.rejoin([restarted, engines[1]], 0)  # ... a restarted engine must serve what the others serve
    assert ray.get(restarted.history.remote()) == [("weights after 1 updates", 1)]
    assert ray.get(engines[0].history.remote()) == [("weights after 1 updates", 1)]


@pytest.mark.parametrize("before,after", [(2, 3), (4, 1)])
def test_samples_saved_by_one_request_count_resume_under_another(tmp_path, before, after):
    """Elastic resume: a checkpoint's pending samples (max_staleness >= 1) were split into as many
    requests as the old layout had; the new layout gets the same samples, re-split by whole
    groups, with nothing regenerated."""
    per_step = 12
    pool = Group([FakeEngine.remote() for _ in range(2)])
    teach = Group([FakeTeacher.remote()])
    old = RolloutPipeline(pool, [teach], lambda s: prompts_for(s, per_step), before, 1, 4, print)
    old.take(0, 0)  # step 1's requests are now in flight
    old.save(str(tmp_path))
    calls = sum(len(c) for c in ray.get([e.calls.remote() for e in pool.actors]))
    saved = [u for r in old.inflight[1] for u in ray.get(r.shard).uids_N.tolist()]

    # the run ends after step 2: the new pipeline has nothing of its own to draw
    new = RolloutPipeline(pool, [teach], lambda s: pytest.fail("no prompt is drawn again"), after, 1, 2, print)
    new.load(str(tmp_path))
    batch = new.take(1, 1)
    assert len(batch.requests) == after
    assert [u for r in batch.requests for u in ray.get(r.shard).uids_N.tolist()] == saved  # same samples, same order
    assert [len(s.uids) for s in batch.summaries] == [per_step * G // after] * after  # whole groups, near-equal
    assert sum(len(c) for c in ray.get([e.calls.remote() for e in pool.actors])) == calls  # nothing regenerated
    assert sum(ray.get([ref for r in batch.requests for ref in r.score])) == per_step * G
