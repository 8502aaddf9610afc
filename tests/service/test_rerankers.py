"""Reranker prompts and scores: the published prompt texts, ids equal to tokenizing the whole text without added
special tokens and to the family's own reference procedure (Qwen3-Reranker's model card, FlagEmbedding's
FlagLLMReranker, transformers' ``tokenizer(query, document)``), and the raw-score functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer

from service.chat import SpecialTokens
from service.errors import UnsupportedOption
from service.rerankers import (
    BGE_GEMMA_DEFAULT_INSTRUCTION,
    QWEN3_DEFAULT_INSTRUCTION,
    PairClassifierReranker,
    PromptReranker,
    RerankerKind,
    RerankerSetupError,
    make_reranker,
    relevance_scores,
)
from tests.checkpoints import TRAINING_TEXT, make_tokenizer

transformers = pytest.importorskip("transformers")

RERANK_TEXT = (
    TRAINING_TEXT + "yes\nno\nYes\nNo\nWhat is a panda? The giant panda is a bear. Query Document Instruct\n" * 20
)

QUERY = "What is a {panda}?"  # braces stay text
DOCUMENTS = ["hi", "The giant panda (Ailuropoda melanoleuca) is a bear.\n", "", "été <|im_end|> <bos> yes"]


def byte_level_tokenizer(special: list[str], plain: list[str] = (), bos: str | None = None) -> Tokenizer:
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([RERANK_TEXT], trainer=trainer)
    if plain:
        tok.add_tokens([AddedToken(text, special=False, normalized=False) for text in plain])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def write_folder(folder: Path, tokenizer: Tokenizer, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend", **config}))
    return folder


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory) -> Path:
    tokenizer = byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], plain=["<think>", "</think>"])
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
    return write_folder(tmp_path_factory.mktemp("qwen3"), tokenizer, config)


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory) -> Path:
    # Gemma's tokenizer.json adds <bos> in its post-processor; the prompt writes it itself
    tokenizer = byte_level_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>"], bos="<bos>")
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    return write_folder(tmp_path_factory.mktemp("gemma"), tokenizer, config)


def load(folder: Path) -> tuple[Tokenizer, SpecialTokens]:
    return Tokenizer.from_file(str(folder / "tokenizer.json")), SpecialTokens.from_checkpoint(folder)


def test_qwen3_prompt_text(qwen3_folder):
    reranker = make_reranker("qwen3", *load(qwen3_folder))
    assert isinstance(reranker, PromptReranker) and reranker.kind is RerankerKind.QWEN3
    assert reranker.prompt("q?", "a doc") == (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
        'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
        "<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n<Query>: q?\n"
        "<Document>: a doc<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert "<Instruct>: Find code\n<Query>: What is a {panda}?\n" in reranker.prompt(QUERY, "x", "Find code")
    assert "<Instruct>: \n" in reranker.prompt(QUERY, "x", "")  # only a missing instruction takes the default


def test_qwen3_ids_match_the_model_card_procedure(qwen3_folder):
    """The model card tokenizes prefix and suffix without special tokens and the formatted body with the
    tokenizer's defaults, then concatenates: the same ids as our one text."""
    tokenizer, special = load(qwen3_folder)
    reranker = make_reranker(RerankerKind.QWEN3, tokenizer, special)
    hf = transformers.AutoTokenizer.from_pretrained(str(qwen3_folder))
    prefix = (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
        'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    )
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    for instruction in (None, "Find the passage that names the animal"):
        body_instruction = QWEN3_DEFAULT_INSTRUCTION if instruction is None else instruction
        bodies = [f"<Instruct>: {body_instruction}\n<Query>: {QUERY}\n<Document>: {doc}" for doc in DOCUMENTS]
        expected = [
            hf.encode(prefix, add_special_tokens=False) + body + hf.encode(suffix, add_special_tokens=False)
            for body in hf(bodies)["input_ids"]
        ]
        ids = reranker.prompt_ids(QUERY, DOCUMENTS, instruction)
        assert ids == expected
        assert ids == [
            tokenizer.encode(reranker.prompt(QUERY, d, instruction), add_special_tokens=False).ids for d in DOCUMENTS
        ]
    assert reranker.label_tokens == ("no", "yes")
    assert reranker.label_token_ids == (hf.convert_tokens_to_ids("no"), hf.convert_tokens_to_ids("yes"))
    assert reranker.prompt_ids(QUERY, []) == []


def test_bge_gemma_prompt_text(gemma_folder):
    reranker = make_reranker("bge-gemma", *load(gemma_folder))
    assert reranker.prompt("q?", "a passage") == (
        "<bos>A: q?\nB: a passage\nGiven a query A and a passage B, determine whether the passage contains an answer "
        "to the query by providing a prediction of either 'Yes' or 'No'."
    )
    assert reranker.prompt(QUERY, "p", "Is B about A?") == "<bos>A: What is a {panda}?\nB: p\nIs B about A?"


def test_bge_gemma_ids_match_flag_embedding_procedure(gemma_folder):
    """FlagLLMReranker: [bos] + ids("A: query") + ids("\\n") + ids("B: passage") + ids("\\n") + ids(prompt), each
    without special tokens: equal to our one text tokenized without special tokens (one BOS, not two)."""
    tokenizer, special = load(gemma_folder)
    reranker = make_reranker(RerankerKind.BGE_GEMMA, tokenizer, special)
    hf = transformers.AutoTokenizer.from_pretrained(str(gemma_folder))

    def pieces(text: str) -> list[int]:
        return hf(text, add_special_tokens=False)["input_ids"]

    for instruction in (None, "Is B about A?"):
        prompt = BGE_GEMMA_DEFAULT_INSTRUCTION if instruction is None else instruction
        expected = [
            [hf.bos_token_id]
            + pieces(f"A: {QUERY}")
            + pieces("\n")
            + pieces(f"B: {doc}")
            + pieces("\n")
            + pieces(prompt)
            for doc in DOCUMENTS
        ]
        ids = reranker.prompt_ids(QUERY, DOCUMENTS, instruction)
        assert ids == expected
        # one BOS, not two: the tokenizer's post-processor is not applied (the last passage writes its own "<bos>",
        # a token in FlagEmbedding's encoding of it too)
        assert [row[0] == hf.bos_token_id and row.count(hf.bos_token_id) for row in ids] == [1, 1, 1, 2]
    assert reranker.label_token_ids == (pieces("Yes")[0],) and len(pieces("Yes")) == 1


def test_bge_gemma_without_a_distinct_bos_starts_with_the_query(gemma_folder, tmp_path):
    """FlagEmbedding prepends BOS only when the tokenizer has one that is not its pad token."""
    tokenizer, _ = load(gemma_folder)
    for names in ({"pad_token": "<pad>"}, {"bos_token": "<pad>", "pad_token": "<pad>"}):
        folder = write_folder(tmp_path / str(len(names)), tokenizer, names)
        reranker = make_reranker("bge-gemma", tokenizer, SpecialTokens.from_checkpoint(folder))
        assert reranker.prompt("q", "p").startswith("A: q\nB: p\n")


@pytest.mark.parametrize(
    "single, pair",
    [("[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1"), ("<s> $A </s>", "<s> $A </s> </s> $B </s>")],
)
def test_classifier_pair_encoding_matches_transformers(tmp_path, single, pair):
    """A sequence classifier reads the tokenizer's own pair encoding, as transformers' tokenizer(query, document)."""
    from tokenizers import processors

    tokenizer = byte_level_tokenizer(["[CLS]", "[SEP]", "<s>", "</s>", "<pad>"])
    specials = [(name, tokenizer.token_to_id(name)) for name in ("[CLS]", "[SEP]", "<s>", "</s>") if name in single]
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    folder = write_folder(tmp_path, tokenizer, {"pad_token": "<pad>"})
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    reranker = make_reranker(None, Tokenizer.from_file(str(folder / "tokenizer.json")))
    assert isinstance(reranker, PairClassifierReranker) and reranker.label_token_ids == ()
    assert reranker.prompt_ids(QUERY, DOCUMENTS) == [hf(QUERY, doc)["input_ids"] for doc in DOCUMENTS]


def test_classifier_refuses_an_instruction():
    reranker = make_reranker(None, make_tokenizer())
    with pytest.raises(UnsupportedOption, match="instruction") as refused:
        reranker.prompt_ids("q", ["d"], instruction="Judge")
    assert refused.value.param == "instruction"


def test_raw_scores(qwen3_folder, gemma_folder):
    """Qwen3: yes minus no, whose sigmoid is the model card's softmax over (no, yes); bge-gemma: the Yes logit;
    a classifier: its one output. relevance_score is the sigmoid unless the activation is off."""
    logits = torch.randn(5, 2, generator=torch.Generator().manual_seed(0)) * 6  # [n, (no, yes)]
    qwen3 = make_reranker("qwen3", *load(qwen3_folder))
    raw = qwen3.raw_scores(logits)
    assert torch.equal(raw, logits[:, 1] - logits[:, 0])
    model_card = torch.nn.functional.log_softmax(logits, dim=1)[:, 1].exp()
    assert (relevance_scores(raw) - model_card).abs().max() < 1e-6
    assert torch.equal(relevance_scores(raw, use_activation=False), raw)

    yes = logits[:, :1]  # [n, 1]
    bge = make_reranker("bge-gemma", *load(gemma_folder))
    assert torch.equal(bge.raw_scores(yes), yes[:, 0])
    assert torch.equal(relevance_scores(bge.raw_scores(yes)), torch.sigmoid(yes[:, 0]))

    head = logits[:, 1:]  # [n, 1] classifier outputs
    assert torch.equal(make_reranker(None, make_tokenizer()).raw_scores(head), head[:, 0])


def word_level(words: list[str], special: list[str] = ()) -> Tokenizer:
    from tokenizers import models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(list(special))
    return tokenizer


def test_setup_errors_name_the_missing_piece(gemma_folder):
    tokenizer, special = load(gemma_folder)
    with pytest.raises(RerankerSetupError, match="<|im_start|>"):
        make_reranker("qwen3", tokenizer, special)  # no ChatML tokens
    with pytest.raises(RerankerSetupError, match="no token 'no' in its vocabulary"):
        make_reranker("qwen3", word_level(["yes"], ["<|im_start|>", "<|im_end|>"]))
    assert make_reranker("qwen3", word_level(["yes", "no"], ["<|im_start|>", "<|im_end|>"])).label_token_ids == (2, 1)
    with pytest.raises(RerankerSetupError, match="encodes 'Yes' as"):
        make_reranker("bge-gemma", make_tokenizer())  # split into pieces by this vocabulary
    with pytest.raises(RerankerSetupError, match="encodes 'Yes' as"):
        make_reranker("bge-gemma", word_level(["No"]))  # the unknown token
    with pytest.raises(RerankerSetupError, match="'<bos>' as one special token"):
        make_reranker("bge-gemma", word_level(["Yes", "<bos>"]), SpecialTokens(by_name={"bos_token": "<bos>"}))
    with pytest.raises(ValueError):
        make_reranker("monot5", tokenizer, special)
