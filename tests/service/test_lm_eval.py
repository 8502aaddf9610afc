"""lm-evaluation-harness itself (`local-completions`, remote tokenizer, batch size > 1) against a live server:
every log-likelihood equals the model's (transformers, float32) within 1e-4, and is_greedy equals the argmax."""

from __future__ import annotations

import pytest
import torch

from tests.service.shared_servers import API_KEY, shared_server

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402

PAIRS = [
    ("The quick brown fox", " jumps over the lazy dog."),
    ("Language models score text by", " predicting the next token."),
    ("Logits are", " unnormalized log-probabilities"),
    ("", "Tensor parallelism splits each weight matrix"),  # empty context: the BOS from /tokenizer_info conditions
    ("A softmax turns them into ", "a distribution"),  # trailing space moves to the continuation
    ("x", "y"),
]


@pytest.fixture(scope="module")
def server(start_server, tiny_checkpoint):
    return shared_server(start_server, tiny_checkpoint)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from model.families.tokenizer import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


def make_lm(server, monkeypatch, **kw) -> LocalCompletionsAPI:
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # what lm-eval sends as the completions' bearer token
    return LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="tiny", tokenizer_backend="remote",
                               auth_token=API_KEY, max_length=256, max_retries=1, **kw)


def reference(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    seq = ctx + cont
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
    rows = logp[len(ctx) - 1 : len(seq) - 1]
    target = torch.tensor(cont)
    ll = float(rows.gather(1, target[:, None]).sum())
    return ll, bool((rows.argmax(-1) == target).all())


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair / loglikelihood with our tokenizer (no special tokens), BOS for ''."""
    if context == "":
        return [1], tok.encode(continuation, add_special_tokens=False).ids
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False).ids
    ctx = tok.encode(context, add_special_tokens=False).ids
    return ctx, whole[len(ctx):]


@pytest.mark.parametrize("concurrent", [1, 2])
def test_loglikelihood_matches_the_model(server, monkeypatch, hf_reference, tokenizer, concurrent):
    lm = make_lm(server, monkeypatch, batch_size=4, num_concurrent=concurrent)
    assert lm.tokenizer_backend == "remote" and lm.prefix_token_id == 1 and lm.eot_token_id == 2
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(PAIRS)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    assert len(got) == len(PAIRS)
    for pair, (ll, greedy) in zip(PAIRS, got):
        want_ll, want_greedy = reference(hf_reference, *encode_pair(tokenizer, *pair))
        assert ll == pytest.approx(want_ll, abs=1e-4), pair
        assert greedy == want_greedy, pair


def test_is_greedy_true_for_argmax_continuations(server, monkeypatch, hf_reference):
    """Token requests whose continuations are the model's greedy tokens (and some that are not), batched."""
    lm = make_lm(server, monkeypatch, batch_size=3)
    requests = []
    for ctx in ([1, 50, 60, 70], [1, 200], [1, 9, 9, 9, 9, 9, 9, 9], [5], [1, 120, 33, 250, 17]):
        seq = list(ctx)
        for _ in range(3):
            with torch.no_grad():
                seq.append(int(hf_reference(torch.tensor([seq])).logits[0, -1].argmax()))
        requests.append((None, ctx, seq[len(ctx):]))  # greedy
        requests.append((None, ctx, seq[len(ctx):-1] + [(seq[-1] + 1) % 300]))  # last token not greedy
    got = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    for (_, ctx, cont), (ll, greedy) in zip(requests, got):
        want_ll, want_greedy = reference(hf_reference, ctx, cont)
        assert ll == pytest.approx(want_ll, abs=1e-4)
        assert greedy == want_greedy
    assert [g for _, g in got] == [True, False] * 5


def test_loglikelihood_rolling(server, monkeypatch, hf_reference, tokenizer):
    lm = make_lm(server, monkeypatch, batch_size=2)
    text = "The quick brown fox jumps over the lazy dog."
    (got,) = lm.loglikelihood_rolling([Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)],
                                      disable_tqdm=True)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    want, _ = reference(hf_reference, [1], ids)
    assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.slow
def test_multiple_choice_scores_are_the_same_with_prefix_sharing_on_and_off(server, start_server, tiny_checkpoint,
                                                                           monkeypatch):
    """lm-eval's multiple-choice shape (each context with 4 continuations, 8 prompts per request, concurrent
    clients) gets every log-likelihood and is_greedy bit for bit the same from a server sharing prefixes (the
    default) and from one with --prefix-sharing off; the shared one computed fewer rows."""
    off_server = shared_server(start_server, tiny_checkpoint, "--prefix-sharing", "off")
    contexts = ["The quick brown fox jumps over the lazy dog while the cat sleeps.",
                "Language models score text by predicting the next token, one at a time.",
                "Tensor parallelism splits each weight matrix across the ranks of a group."]
    choices = [" yes", " no, not at all", " perhaps later", " the answer is four"]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(c, k), idx=i)
                for i, (c, k) in enumerate((c, k) for c in contexts for k in choices)]
    before = server.metric("logitserve_prefix_shared_tokens_total")
    on = make_lm(server, monkeypatch, batch_size=8, num_concurrent=2).loglikelihood(requests, disable_tqdm=True)
    off = make_lm(off_server, monkeypatch, batch_size=8, num_concurrent=2).loglikelihood(requests, disable_tqdm=True)
    assert on == off
    assert server.metric("logitserve_prefix_shared_tokens_total") > before
    assert off_server.metric("logitserve_prefix_shared_tokens_total") == 0
