"""The batcher alone, against a fake pool: token-budget packing, oversize requests, cancelled work, requeue."""

from __future__ import annotations

import asyncio

import numpy as np

from service.batcher import Batcher, Work
from service.metrics import Metrics
from service.workers import Requeue
from service.workers.protocol import BatchDone, RequestResult


class FakeReplica:
    def __init__(self, index=0):
        self.index = index
        self.inflight = []
        self.inflight_tokens = 0
        self.batches = []
        self.batch_of = {}
        self.fail_next = None

    @property
    def free_slots(self):
        return 2 - sum(not f.done() for f in self.inflight)

    def submit(self, batch):
        fut = asyncio.get_running_loop().create_future()
        self.batches.append(batch)
        self.inflight.append(fut)
        self.batch_of[fut] = batch
        if self.fail_next is not None:
            fut.set_exception(self.fail_next)
            self.fail_next = None
        return fut

    def finish_all(self):
        for fut in self.inflight:
            if not fut.done():
                fut.set_result(FakeResults(self.batch_of[fut]))
        self.inflight = []


class FakeResults:
    """A replica's answer to a batch (as MappedBatch): every request answered, no tensors."""

    def __init__(self, batch):
        self.done = BatchDone(0, [RequestResult() for _ in batch.spans], forward_s=0.001, oom_retries=0)

    def outputs(self, index, reservation=None):
        return None


class FakePool:
    def __init__(self, replicas):
        self.replicas = replicas

    def pick(self):
        free = [g for g in self.replicas if g.free_slots > 0]
        return min(free, key=lambda g: -g.free_slots) if free else None


def work(n, loop):
    return Work(np.arange(n, dtype=np.int64), [n], None, loop.create_future())


async def _settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_packing_budget_oversize_and_cancelled():
    async def main():
        loop = asyncio.get_running_loop()
        g = FakeReplica()
        b = Batcher(FakePool([g]), max_batch_tokens=10, max_queue_tokens=100, metrics=Metrics())
        b.start()
        first = work(3, loop)
        b.submit(first)
        await _settle()
        assert [bt.num_tokens for bt in g.batches] == [3]  # work-conserving: sent at once, not waiting to fill
        ws = [work(4, loop), work(4, loop), work(4, loop), work(25, loop), work(2, loop)]
        for w in ws:
            b.submit(w)
        await _settle()
        assert [bt.num_tokens for bt in g.batches] == [3, 8]  # prefetched second batch, packed to the budget
        ws[4].future.cancel()  # a client gone while queued
        await _settle()
        assert b.queued_tokens == 4 + 25
        g.finish_all()
        await _settle()
        # the 25-token request is larger than the budget: it runs alone; the cancelled one never runs
        assert [bt.num_tokens for bt in g.batches] == [3, 8, 4, 25]
        g.finish_all()
        await _settle()
        assert len(g.batches) == 4 and b.queued_tokens == 0
        assert all(w.future.done() for w in ws)
        await b.stop()

    asyncio.run(main())


def test_queue_limit_and_requeue():
    async def main():
        loop = asyncio.get_running_loop()
        g = FakeReplica()
        b = Batcher(FakePool([g]), max_batch_tokens=100, max_queue_tokens=10, metrics=Metrics())
        b.start()
        g.fail_next = Requeue()
        w = work(6, loop)
        b.submit(w)
        await _settle()
        # requeued and sent again
        assert len(g.batches) == 2 and not w.future.done()
        b.submit(work(6, loop))  # goes to the second slot
        await _settle()
        b.submit(work(6, loop))  # queued: 6 tokens
        try:
            b.submit(work(6, loop))
        except Exception as exc:
            assert type(exc).__name__ == "QueueFull"
        else:
            raise AssertionError("expected QueueFull")
        await b.stop()

    asyncio.run(main())


def test_least_loaded_replica():
    async def main():
        loop = asyncio.get_running_loop()
        replicas = [FakeReplica(0), FakeReplica(1)]
        b = Batcher(FakePool(replicas), max_batch_tokens=4, max_queue_tokens=100, metrics=Metrics())
        b.start()
        for _ in range(4):
            b.submit(work(4, loop))
            await _settle()
        assert [len(g.batches) for g in replicas] == [2, 2]
        await b.stop()

    asyncio.run(main())


def context_work(context: int, n: int, loop, sequences: int = 1):
    """A request of `sequences` sequences of n (>= SHARING_KEY_TOKENS) tokens, each starting with that many tokens
    `context`."""
    from service.packing import SHARING_KEY_TOKENS

    seq = np.concatenate([np.full(SHARING_KEY_TOKENS, context), np.arange(n - SHARING_KEY_TOKENS)]).astype(np.int64)
    return Work(np.tile(seq, sequences), [n] * sequences, None, loop.create_future())


def test_batches_group_requests_that_share_a_prefix_without_starving_others():
    """Interleaved requests of two contexts: each batch starts with the oldest request, then takes the requests of
    its context (within the budget), then the rest in arrival order. Requests sharing nothing are never overtaken
    by more than one batch per request queued before them."""

    async def main():
        loop = asyncio.get_running_loop()
        g = FakeReplica()
        b = Batcher(FakePool([g]), max_batch_tokens=60, max_queue_tokens=1000, metrics=Metrics())
        b.start()
        blocker = [work(60, loop), work(60, loop)]  # fill both slots: what follows queues
        for w in blocker:
            b.submit(w)
        await _settle()
        a = [context_work(1, 20, loop) for _ in range(3)]
        c = [context_work(2, 20, loop) for _ in range(3)]
        lone = work(20, loop)  # shares nothing (too short a key)
        order = [a[0], c[0], lone, a[1], c[1], a[2], c[2]]
        for w in order:
            b.submit(w)
        await _settle()
        for _ in range(4):
            g.finish_all()
            await _settle()
        batches = g.batches[2:]
        # requests by their first token: 1 and 2 for the contexts, 0 for the lone one
        firsts = [[int(t) for t in bt.input_ids[bt.offsets[:-1]]] for bt in batches]
        assert firsts == [[1, 1, 1], [2, 2, 2], [0]]
        assert all(w.future.done() for w in order)
        await b.stop()

    asyncio.run(main())


def test_the_oldest_request_is_always_in_the_next_batch():
    """A stream of requests sharing a context does not starve an older one that shares nothing."""

    async def main():
        loop = asyncio.get_running_loop()
        g = FakeReplica()
        b = Batcher(FakePool([g]), max_batch_tokens=40, max_queue_tokens=10000, metrics=Metrics())
        b.start()
        for w in [work(40, loop), work(40, loop)]:
            b.submit(w)
        await _settle()
        b.submit(context_work(3, 20, loop))
        lone = work(20, loop)
        b.submit(lone)
        for _ in range(4):
            for _ in range(3):
                b.submit(context_work(3, 20, loop))
            g.finish_all()
            await _settle()
            if lone.future.done():
                break
        sent = [[int(t) for t in bt.input_ids[bt.offsets[:-1]]] for bt in g.batches[2:]]
        assert sent[0] == [3, 3]  # the oldest, then one sharing its context ahead of the lone request
        assert sent[1][0] == 0  # the lone request heads the next batch
        await b.stop()

    asyncio.run(main())


def test_in_process_batches_follow_the_batchers_rule():
    """The benchmarks' batches (packing.plan_batches) are the batcher's: the oldest first, then the sequences that
    share its prefix, then arrival order, within the token budget."""
    from service.packing import SHARING_KEY_TOKENS, plan_batches

    def seq(context: int, n: int = 20) -> list[int]:
        return [context] * SHARING_KEY_TOKENS + list(range(100, 100 + n - SHARING_KEY_TOKENS))

    sequences = [seq(1), seq(2), list(range(20)), seq(1), seq(2), seq(1), seq(2)]  # as in the batcher's test above
    assert plan_batches(sequences, 60) == [[0, 3, 5], [1, 4, 6], [2]]
    assert plan_batches([[1] * 70, [2] * 10, [3] * 50], 60) == [[0], [1, 2]]  # oversize alone; whole sequences
