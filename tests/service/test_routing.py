"""Cache-aware routing against fake replicas: the shadow tree's bound and LRU order, the choice of replica, the
balance against a busier holder, forgetting a restarted replica, and the batcher feeding the prefix cache series."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from service.batcher import Batcher, Work
from service.metrics import Metrics
from service.packing import row_offsets
from service.routing import PrefixRouter, ShadowTree, cached_token_bytes
from model.layers.attention_kernels import AttentionKind
from model.runtime.numerics import Numerics
from service.workers.protocol import Batch, BatchDone, RequestResult, RequestSpan

CONFIG = SimpleNamespace(num_layers=2, num_kv_heads=1, head_dim=4)  # 2 x 2 x 1 x 4 x 4 = 64 bytes a float32 token
TOKEN_BYTES = 64


def test_cached_token_bytes():
    assert cached_token_bytes(CONFIG, "float32") == TOKEN_BYTES
    assert cached_token_bytes(CONFIG, "bfloat16") == TOKEN_BYTES // 2


def test_shadow_tree_matches_prefixes_and_evicts_least_recently_used():
    tree = ShadowTree(capacity=10)
    a, b = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]
    tree.insert(a)
    assert tree.match(a + [99]) == 6 and tree.match([1, 2, 99]) == 2 and tree.match([99]) == 0
    tree.insert(b)  # 12 tokens > 10: a's two last tokens (least recently used leaves) go
    assert tree.size == 10 and tree.match(a) == 4 and tree.match(b) == 6
    tree.insert([1, 2, 3])  # a's head is used again: b's tail goes next
    tree.insert([1, 2, 3, 4, 20, 21])
    assert tree.size == 10 and tree.match([1, 2, 3, 4, 20, 21]) == 6 and tree.match(b) == 4


def test_shadow_tree_smaller_than_one_sequence_keeps_its_head():
    tree = ShadowTree(capacity=5)
    tree.insert(list(range(8)))
    assert tree.size == 5 and tree.match(list(range(8))) == 5
    tree.clear()
    assert tree.size == 0 and tree.match(list(range(8))) == 0


class Replica:
    def __init__(self, index: int, cache_bytes: int = TOKEN_BYTES * 1000):
        self.index = index
        self.state = "ready"
        self.restarts = 0
        self.inflight: list = []
        self.loaded = Numerics("float32", True, AttentionKind.PREFIX_STABLE, True, cache_bytes)

    @property
    def free_slots(self) -> int:
        return 2 - len(self.inflight) if self.state == "ready" else 0


def batch(*seqs: list[int]) -> Batch:
    ids = np.array([t for s in seqs for t in s], dtype=np.int64)
    return Batch(ids, row_offsets([len(s) for s in seqs]), [None] * len(seqs), [RequestSpan(0, len(seqs))])


def request(*seqs: list[int]):
    """What the router reads of a queued Work."""
    return SimpleNamespace(input_ids=np.array([t for s in seqs for t in s], dtype=np.int64),
                           lengths=[len(s) for s in seqs])


def place(router: PrefixRouter, pool, *seqs: list[int]):
    """The replica the router places one request on, and the batch sent there with its Route."""
    placed = router.place(pool, [(0, request(*seqs))])
    assert placed is not None
    return router.dispatched(placed[1], batch(*seqs))


def pair(**kw) -> SimpleNamespace:
    return SimpleNamespace(replicas=[Replica(0, **kw), Replica(1, **kw)])


P, Q = list(range(100, 200)), list(range(300, 400))  # two 100-token prefixes


def test_a_repeat_goes_to_the_replica_holding_its_prefix():
    pool, router = pair(), PrefixRouter(CONFIG)
    assert router.active(pool)
    first = place(router, pool, P + [1])
    router.answered(first)
    second = place(router, pool, Q + [2])  # nothing of Q cached anywhere: the emptier cache
    router.answered(second)
    assert (first.replica.index, second.replica.index) == (0, 1)
    for suffix in ([3, 4], [5], [6, 7, 8]):
        for prefix, holder in ((Q, 1), (P, 0)):
            route = place(router, pool, prefix + suffix, prefix + suffix[:1])
            assert route.replica.index == holder and route.work == len(suffix) + 1
            router.answered(route)
    # A batch for replica 0 formed from a P request: more P joins, Q (cached by replica 1) does not, nor does a
    # request of neither while replica 1 is free and less busy than the batch makes replica 0; once replica 1 is
    # full, it does.
    joins = router.joiner(pool, pool.replicas[0], request(P + [9]))
    assert joins(request(P + [10])) and not joins(request(Q + [9]))
    fresh = request(list(range(900, 950)))
    assert not joins(fresh)
    pool.replicas[1].inflight = [object(), object()]
    assert joins(fresh) and not joins(request(Q + [10]))


def test_a_clearly_busier_holder_is_passed_over_and_a_full_one_waited_for():
    pool, router = pair(), PrefixRouter(CONFIG)
    busy = place(router, pool, P)  # replica 0 holds P, its 100 tokens still pending
    assert busy.replica.index == 0
    # P again saves 100 tokens on replica 0, which is 100 busier: a tie, broken by the emptier cache.
    router.answered(place(router, pool, Q))
    assert router._pending == {0: 100, 1: 0}
    assert router.place(pool, [(0, request(P + [1]))])[1].index == 0  # replica 1 holds Q: 100 + 1 < 0 + 101 + ...
    pool.replicas[1].inflight = [object(), object()]  # replica 1 full: a Q request waits, a later P one goes
    assert router.place(pool, [(0, request(Q + [1]))]) is None
    assert router.place(pool, [(3, request(Q + [1])), (5, request(P + [2]))]) == (5, pool.replicas[0])
    router.answered(busy)
    pool.replicas[1].inflight = []
    big = place(router, pool, list(range(1000, 1300)))  # 300 new tokens pending on the emptier... replica 0 (tie)
    assert big.replica.index == 0 and router._pending == {0: 300, 1: 0}
    # P on replica 0 costs 300 + 1, on replica 1 0 + 101: replica 0 is clearly busier
    assert router.place(pool, [(0, request(P + [1]))])[1].index == 1


def test_a_restarted_replica_is_forgotten():
    pool, router = pair(), PrefixRouter(CONFIG)
    router.answered(place(router, pool, P))
    router.answered(place(router, pool, Q))
    pool.replicas[0].restarts += 1  # its cache starts empty: P is held nowhere now
    route = place(router, pool, P + [1])
    assert route.work == 101 and route.replica.index == 0  # the emptier cache, not a remembered hit
    pool.replicas[1].state = "restarting"  # not ready: neither placed on nor counted
    assert not router.active(pool)


def test_off_or_without_caches_nothing_is_placed():
    assert not PrefixRouter(CONFIG, enabled=False).active(pair())
    assert not PrefixRouter(CONFIG).active(pair(cache_bytes=0))
    assert not PrefixRouter(CONFIG).active(SimpleNamespace(replicas=[Replica(0)]))


def test_the_shadow_tree_is_bounded_like_the_replica_cache():
    pool, router = pair(cache_bytes=TOKEN_BYTES * 150), PrefixRouter(CONFIG)
    for prefix in (P, Q, P, Q):
        router.answered(place(router, pool, prefix))
    assert [router._trees[i].size for i in (0, 1)] == [100, 100]
    router.answered(place(router, pool, list(range(500, 620))))  # 120 new tokens: replica 0 (a tie)
    assert [router._trees[i].size for i in (0, 1)] == [150, 100]


class FakeReplica(Replica):
    """A replica the batcher submits to, answering each batch with the cache figures given."""

    def __init__(self, index: int, hit_tokens: int, cache_bytes_now: int):
        super().__init__(index)
        self.answer = (hit_tokens, cache_bytes_now)
        self.batches: list[Batch] = []

    def submit(self, b: Batch):
        fut = asyncio.get_running_loop().create_future()
        self.batches.append(b)
        done = BatchDone(0, [RequestResult() for _ in b.spans], 0.001, 0, 0, *self.answer)
        fut.set_result(SimpleNamespace(done=done, outputs=lambda i, reservation=None: None))
        return fut


class FakePool:
    def __init__(self, replicas):
        self.replicas = replicas

    def pick(self):
        free = [r for r in self.replicas if r.free_slots > 0]
        return free[-1] if free else None  # the "least busy" is always the last: routing must override it


def test_batcher_routes_and_counts_hits_and_cache_bytes():
    async def main():
        loop = asyncio.get_running_loop()
        replicas = [FakeReplica(0, hit_tokens=7, cache_bytes_now=1000), FakeReplica(1, hit_tokens=5, cache_bytes_now=2000)]
        metrics = Metrics()
        b = Batcher(FakePool(replicas), max_batch_tokens=1000, max_queue_tokens=10000, metrics=metrics,
                    router=PrefixRouter(CONFIG))
        b.start()
        for seq in (P + [1], Q + [1], P + [2], Q + [2], P + [3]):
            w = Work(np.array(seq, dtype=np.int64), [len(seq)], None, loop.create_future())
            b.submit(w)
            await asyncio.wait_for(w.future, 5)
        await b.stop()
        return metrics, replicas

    metrics, replicas = asyncio.run(main())
    # Each prefix stays on one replica although the pool's least busy pick is always replica 1.
    assert [len(b.input_ids) for b in replicas[0].batches] == [101, 101, 101]
    assert all(b.input_ids[0] == P[0] for b in replicas[0].batches)
    assert all(b.input_ids[0] == Q[0] for b in replicas[1].batches) and len(replicas[1].batches) == 2
    registry = metrics.registry
    assert registry.get_sample_value("logitserve_prefix_cache_hit_tokens_total") == 3 * 7 + 2 * 5
    assert registry.get_sample_value("logitserve_prefix_cache_bytes", {"replica": "0"}) == 1000
    assert registry.get_sample_value("logitserve_prefix_cache_bytes", {"replica": "1"}) == 2000

