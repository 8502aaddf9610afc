"""Mixture of experts (model/layers/moe.py) and the Mixtral / Qwen3-MoE entries of the registry: transformers 5's bits,
tensor parallelism, batch invariance, cost. Whole-model parity for every recipe is in test_parity.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import model.layers.moe as moe
from model import ModelRunner, OutputSpec, ReturnHiddenStates, ReturnLogits, launch_local
from model.families.architectures import ARCHITECTURES
from model.families.config import ModelConfig, UnsupportedModelError
from model.distributed import ParallelContext
from model.runtime.memory import retain_freed_memory
from model.families.moe_config import QWEN3_MOE_WEIGHTS, MoeConfig
from model.layers.moe import SparseMoeBlock
from model.families.weights import CheckpointReader
from tests.checkpoints import RECIPES, load_reference, make_checkpoint
from tests.model.helpers import ragged, reference

HIDDEN = 64
# Recipes of tests/checkpoints.py: Mixtral (8 experts, top-2, expert intermediate 44) and Qwen3-MoE (16 experts,
# top-4, expert intermediate 36, layer 1 dense).
FAMILIES = ("mixtral", "qwen3_moe")
# Ragged token counts: 1 and 3 leave most experts without a token; 512 gives every expert >= 28 rows.
TOKEN_COUNTS = (1, 3, 7, 12, 41, 512)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return {f: make_checkpoint(tmp_path_factory.mktemp(f), f, with_tokenizer=False, vocab_size=300) for f in FAMILIES}


def hf_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def load_block(path: Path, layer: int, parallel: ParallelContext | None = None, **kwargs) -> SparseMoeBlock:
    config = MoeConfig.from_hf_config(hf_config(path))
    block = SparseMoeBlock(config, HIDDEN, parallel or ParallelContext.single(), **kwargs)
    with CheckpointReader(path) as reader:
        block.load(reader, f"model.layers.{layer}.mlp")
    return block


def inputs(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, HIDDEN, generator=g) for n in TOKEN_COUNTS]


def reference_block(path: Path, layer: int, implementation: str = "grouped_mm"):
    hf = load_reference(path)
    hf.set_experts_implementation(implementation)
    return hf.model.layers[layer].mlp


# --- configuration --------------------------------------------------------------------------------------------


def test_config_reads_each_family():
    mixtral = MoeConfig.from_hf_config({"architectures": ["MixtralForCausalLM"], "num_hidden_layers": 2,
                                        "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 14336,
                                        "router_aux_loss_coef": 0.02})
    assert (mixtral.num_experts, mixtral.experts_per_token, mixtral.expert_intermediate_size) == (8, 2, 14336)
    assert mixtral.normalize_top_k and mixtral.float32_routing_weights and mixtral.sparse_layers == (True, True)
    assert mixtral.weight_names.block == "block_sparse_moe"
    # Qwen3-MoE as published (num_experts), every other layer sparse and layer 3 forced dense.
    qwen = MoeConfig.from_hf_config({"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 6,
                                     "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                                     "intermediate_size": 6144, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert (qwen.num_experts, qwen.experts_per_token, qwen.expert_intermediate_size) == (128, 8, 768)
    assert not qwen.normalize_top_k and not qwen.float32_routing_weights  # transformers' defaults
    assert qwen.sparse_layers == (False, True, False, False, False, True)
    assert qwen.weight_names == QWEN3_MOE_WEIGHTS
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok"):
        MoeConfig.from_hf_config({"architectures": ["MixtralForCausalLM"], "num_hidden_layers": 1,
                                  "num_local_experts": 2, "num_experts_per_tok": 3, "intermediate_size": 8})
    with pytest.raises(UnsupportedModelError, match="not a mixture-of-experts"):
        MoeConfig.from_hf_config({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1})


def test_config_reads_what_transformers_writes(checkpoints):
    """transformers 5 writes Qwen3-MoE's num_experts back as num_local_experts, and mlp_only_layers as given."""
    qwen = MoeConfig.from_hf_config(hf_config(checkpoints["qwen3_moe"]))
    assert (qwen.num_experts, qwen.experts_per_token, qwen.expert_intermediate_size) == (16, 4, 36)
    assert qwen.normalize_top_k and qwen.sparse_layers == (True, False, True)
    mixtral = MoeConfig.from_hf_config(hf_config(checkpoints["mixtral"]))
    assert (mixtral.num_experts, mixtral.experts_per_token, mixtral.expert_intermediate_size) == (8, 2, 44)


# --- parity with transformers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_block_computes_transformers_bits(family, checkpoints):
    """Without padding the block makes transformers' default (grouped_mm) calls: the same bits, float32, for
    ragged token counts where most experts get no token."""
    path = checkpoints[family]
    ours, theirs = load_block(path, 0, batch_invariant=False), reference_block(path, 0)
    assert theirs.experts.config._experts_implementation == "grouped_mm"  # transformers' default
    idle = 0
    with torch.no_grad():
        for x in inputs():
            idle += ours.experts.num_experts - ours.gate(x).expert_ids.unique().numel()
            assert torch.equal(ours(x), theirs(x[None])[0]), x.shape
    assert idle > 0  # some experts received no token


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_invariant_block_matches_transformers(family, checkpoints):
    """Padded to multiples of 4 rows the block's matmuls round as a large call does: transformers' bits where its
    own calls are large (T=512: every expert has >= 28 rows), within 1e-5 where they are not."""
    path = checkpoints[family]
    ours = load_block(path, 0)
    reference = {name: reference_block(path, 0, name) for name in ("grouped_mm", "eager")}
    with torch.no_grad():
        for x in inputs(seed=1):
            got = ours(x)
            for name, theirs in reference.items():
                torch.testing.assert_close(got, theirs(x[None])[0], atol=1e-5, rtol=0, msg=f"{name} {tuple(x.shape)}")
        x = inputs(seed=1)[-1]
        assert torch.bincount(ours.gate(x).expert_ids.reshape(-1)).min() >= 28
        assert torch.equal(ours(x), reference["grouped_mm"](x[None])[0])


def test_grouped_matmul_and_per_expert_calls_give_the_same_bits(checkpoints, monkeypatch):
    """torch's grouped matmul (CPU float32) and the per-expert loop it replaces where it has no kernel."""
    block = load_block(checkpoints["qwen3_moe"], 0)
    calls = []
    grouped_mm = moe._GROUPED_MM
    monkeypatch.setattr(moe, "_GROUPED_MM", lambda *args, **kwargs: calls.append(1) or grouped_mm(*args, **kwargs))
    with torch.no_grad():
        grouped = [block(x) for x in inputs()]
        assert len(calls) == 2 * len(grouped)  # gate_up and down of every forward
        monkeypatch.setattr(moe, "_GROUPED_MM", None)
        looped = [block(x) for x in inputs()]
    assert all(torch.equal(a, b) for a, b in zip(grouped, looped))


def test_empty_batch(checkpoints):
    block = load_block(checkpoints["qwen3_moe"], 0)
    assert block(torch.zeros(0, HIDDEN)).shape == (0, HIDDEN)


def test_stacked_checkpoint_layout_loads_the_same_weights(checkpoints, tmp_path):
    """transformers 5's in-memory layout (mlp.experts.gate_up_proj / down_proj, Mixtral's block renamed to mlp)."""
    for family, path in checkpoints.items():
        hf = load_reference(path)
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        assert "model.layers.0.mlp.experts.gate_up_proj" in state and "model.layers.0.mlp.gate.weight" in state
        folder = tmp_path / family
        folder.mkdir()
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text((path / "config.json").read_text())
        for rank in range(3):  # sliced loads too (uneven shares)
            ctx = ParallelContext(rank=rank, world_size=3)
            stacked, per_expert = load_block(folder, 2, ctx), load_block(path, 2, ctx)
            for a, b in zip(stacked.parameters(), per_expert.parameters()):
                assert torch.equal(a, b)


# --- tensor parallelism ---------------------------------------------------------------------------------------


def test_each_rank_reads_only_its_slices(checkpoints, monkeypatch):
    """A rank reads its share of every expert's intermediate rows/columns (shares sum to the whole) and the
    whole router; the slices are the checkpoint's."""
    path = checkpoints["mixtral"]
    full = load_block(path, 0)
    reads: list[tuple[str, int]] = []
    original = CheckpointReader.read

    def spy(self, name, *args, **kwargs):
        t = original(self, name, *args, **kwargs)
        reads.append((name, t.numel()))
        return t

    monkeypatch.setattr(CheckpointReader, "read", spy)
    world, expert_elements, shares = 3, 0, []
    for rank in range(world):
        reads.clear()
        block = load_block(path, 0, ParallelContext(rank=rank, world_size=world))
        e = block.experts
        shares.append(e.local_size)
        assert all(n == e.local_size * HIDDEN for name, n in reads if ".experts." in name)
        assert [n for name, n in reads if name.endswith("gate.weight")] == [8 * HIDDEN]
        expert_elements += sum(n for name, n in reads if ".experts." in name)
        lo, hi = e.start, e.start + e.local_size
        full_up = full.experts.gate_up_proj[:, 44:]
        assert torch.equal(e.gate_up_proj[:, : e.local_size], full.experts.gate_up_proj[:, lo:hi])
        assert torch.equal(e.gate_up_proj[:, e.local_size :], full_up[:, lo:hi])
        assert torch.equal(e.down_proj, full.experts.down_proj[:, :, lo:hi])
    assert shares == [15, 15, 14]
    assert expert_elements == full.experts.gate_up_proj.numel() + full.experts.down_proj.numel()


def run_sharded(ctx: ParallelContext, blocks: list[tuple[str, int]], models: list[tuple[str, torch.Tensor, torch.Tensor]]):
    """On each rank: every block's output for every input, then every whole model's outputs (ModelRunner)."""
    torch.set_num_threads(1)
    outs = []
    for path, layer in blocks:
        block = load_block(Path(path), layer, ctx)
        with torch.no_grad():
            outs.append([block(x) for x in inputs()])
    runs = [run_model(ModelRunner.load(p, dtype="float32", parallel=ctx), ids, offsets) for p, ids, offsets in models]
    return outs, runs


@pytest.fixture(scope="module")
def model_cases(checkpoints):
    out = []
    for i, path in enumerate(checkpoints.values()):
        seqs, ids, offsets = ragged([1, 9, 40, 23], 300, seed=i)
        out.append((str(path), seqs, ids, offsets))
    return out


def check_tp_matches_tp1(checkpoints, model_cases, worlds: tuple[int, ...], with_blocks: bool) -> None:
    blocks = [(str(p), layer) for p in checkpoints.values() for layer in (0, 2)] if with_blocks else []
    with torch.no_grad():
        single = [[load_block(Path(p), layer)(x) for x in inputs()] for p, layer in blocks]
    models = [(p, ids, off) for p, _, ids, off in model_cases]
    single_runs = [run_model(ModelRunner.load(p, dtype="float32"), ids, off) for p, ids, off in models]
    for world in worlds:
        for outs, runs in launch_local(run_sharded, world, blocks, models):
            for got_block, want_block in zip(outs, single):
                for got, want in zip(got_block, want_block):
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            for got_run, want_run in zip(runs, single_runs):
                for got, want in zip(got_run, want_run):
                    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=0)
                    for h_got, h_want in zip(got.hidden_states, want.hidden_states):
                        torch.testing.assert_close(h_got, h_want, atol=1e-4, rtol=0)


def test_tp2_matches_tp1(checkpoints, model_cases):
    """Blocks and whole models (the registry's path: ModelRunner.load) of both families at tp=2 against tp=1: one
    all-reduce of partial sums per block, so the same result up to the order of that sum (logits and every
    layer's hidden states within 1e-4; blocks within 1e-5)."""
    check_tp_matches_tp1(checkpoints, model_cases, (2,), with_blocks=True)


@pytest.mark.slow
def test_tp4_matches_tp1(checkpoints, model_cases):
    """The same at tp=4, where the expert shares are uneven (44 -> 11 rows each, 36 -> 9: the per-expert loop)."""
    check_tp_matches_tp1(checkpoints, model_cases, (4,), with_blocks=True)


# --- batch invariance -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_rows_keep_their_bits_in_calls_of_a_multiple_of_four_rows(threads):
    """The CPU fact the padding rests on: in float32 a row of a call of 4, 8, 12, ... rows gets the bits it gets
    in any larger call (calls of 1-3 rows, and of 5-7, 9-11 at some thread counts, round differently)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for k, n in ((64, 84), (30, 64), (64, 8)):  # gate_up, down and router shapes
            w, x = torch.randn(n, k, generator=g), torch.randn(300, k, generator=g)
            whole = F.linear(x, w)
            for rows in (4, 8, 12, 16, 20, 24, 28, 32, 36, 64, 100, 128):
                for start in (0, 13, 300 - rows):
                    assert torch.equal(F.linear(x[start : start + rows], w), whole[start : start + rows]), (k, n, rows)
    finally:
        torch.set_num_threads(previous)


def test_activation_rows_do_not_depend_on_how_many_rows_there_are():
    """silu(gate) * up: a call torch splits across threads may cut a row, rounding the cut part differently;
    _silu_and_mul keeps every row whole. Width 100 leaves a scalar tail after the 16-wide vector loop."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gate_up = torch.randn(2000, 200) * 4
        each_row = torch.cat([moe._silu_and_mul(gate_up[r : r + 1]) for r in range(2000)])
        for rows in (333, 1000, 2000):
            assert torch.equal(moe._silu_and_mul(gate_up[:rows]), each_row[:rows])
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize(("threads", "dtype"), [(1, torch.float32), (2, torch.float32), (2, torch.bfloat16)])
@pytest.mark.parametrize("family", FAMILIES)
def test_token_output_does_not_depend_on_the_batch(family, threads, dtype, checkpoints):
    """A token's block output is the same bits alone and in batches where few or many other tokens share its
    experts, wherever it sits in the batch."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        block = load_block(checkpoints[family], 0).to(dtype)
        g = torch.Generator().manual_seed(7)
        pool = torch.randn(3000, HIDDEN, generator=g).to(dtype)
        with torch.no_grad():
            probe = pool[:1]
            alone = block(probe)
            shares = (block.gate(pool[1:]).expert_ids[:, :, None] == block.gate(probe).expert_ids[0]).any(-1).any(-1)
            sharing, others = pool[1:][shares], pool[1:][~shares]
            assert len(sharing) >= 300 and len(others) >= 300
            for n_sharing, n_others in ((1, 0), (2, 1), (3, 40), (10, 0), (11, 5), (37, 200), (300, 300), (0, 300)):
                batch = torch.cat([sharing[:n_sharing], others[:n_others]])
                for at in (0, len(batch) // 2, len(batch)):
                    with_probe = torch.cat([batch[:at], probe, batch[at:]])
                    assert torch.equal(block(with_probe)[at : at + 1], alone), (n_sharing, n_others, at)
    finally:
        torch.set_num_threads(previous)


# --- cost -----------------------------------------------------------------------------------------------------


def random_block(num_experts: int, top_k: int, hidden: int, intermediate: int) -> SparseMoeBlock:
    config = MoeConfig(num_experts=num_experts, experts_per_token=top_k, expert_intermediate_size=intermediate,
                       normalize_top_k=True, float32_routing_weights=False, sparse_layers=(True,),
                       weight_names=QWEN3_MOE_WEIGHTS)
    block = SparseMoeBlock(config, hidden, ParallelContext.single())
    g = torch.Generator().manual_seed(num_experts * 10 + top_k)
    for p in block.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return block


def test_cost_follows_experts_per_token_not_number_of_experts():
    """Tiny but wide (hidden 32, expert intermediate 1024, 4096 tokens): 64 experts cost about what 8 do at top-2
    (the same rows through expert matmuls; 128 rows per expert keep the weights' reads small beside the compute),
    and top-8 costs several times top-2. A dense all-experts computation would make 64 experts 8x slower.

    Robust to a busy machine: one thread, CPU time of this process, freed memory kept as the server keeps it (no
    page faults of fresh buffers), configurations interleaved, fastest of repeats (bench/moe_block.py has the
    figures, with transformers beside them)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    retain_freed_memory()
    try:
        blocks = {(e, k): random_block(e, k, 32, 1024) for e, k in ((8, 2), (64, 2), (64, 8))}
        x = torch.randn(4096, 32, generator=torch.Generator().manual_seed(0))
        best = dict.fromkeys(blocks, float("inf"))
        with torch.no_grad():
            for block in blocks.values():
                block(x)  # warm-up
            for repeat in range(5):
                for key, block in blocks.items():
                    if key == (64, 8) and repeat >= 1:
                        continue  # several times slower: one run (after the warm-up) is plenty for that comparison
                    start = time.process_time()
                    block(x)
                    best[key] = min(best[key], time.process_time() - start)
    finally:
        torch.set_num_threads(previous)
    ms = {f"{e} experts top-{k}": round(t * 1e3, 1) for (e, k), t in best.items()}
    assert best[(64, 2)] <= 1.25 * best[(8, 2)] and best[(8, 2)] <= 1.25 * best[(64, 2)], ms
    assert best[(64, 8)] >= 2 * best[(64, 2)], ms


# --- the registry's models ------------------------------------------------------------------------------------


def run_model(runner: ModelRunner, ids: torch.Tensor, offsets: torch.Tensor) -> list:
    """Every row's logits and every block's output (hidden-state layers 1..n) of each sequence."""
    layers = tuple(range(1, runner.config.num_layers + 1))
    spec = OutputSpec(return_logits=ReturnLogits.ALL, return_hidden_states=ReturnHiddenStates.ALL, layers=layers)
    return runner.run(ids, offsets, [spec] * (len(offsets) - 1))


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_builds_sparse_and_dense_layers(family, checkpoints):
    """The entry's moe kind puts the sparse block where the config marks the layer sparse, the dense (sharded)
    MLP elsewhere; the TP plan leaves the sparse blocks alone (built at shard size)."""
    config = ModelConfig.from_pretrained(checkpoints[family])
    assert ARCHITECTURES[config.architecture].mlp == "moe" and config.moe is not None
    runner = ModelRunner.load(checkpoints[family], dtype="float32")
    kinds = [type(layer.mlp).__name__ for layer in runner.model.layers]
    assert kinds == ["SparseMoeBlock" if sparse else "MLP" for sparse in config.moe.sparse_layers]
    assert kinds == (["SparseMoeBlock"] * 3 if family == "mixtral" else ["SparseMoeBlock", "MLP", "SparseMoeBlock"])
    with CheckpointReader(checkpoints[family]) as reader:
        for i, layer in enumerate(runner.model.layers):
            if isinstance(layer.mlp, SparseMoeBlock):
                block = config.moe.weight_names.block
                assert torch.equal(layer.mlp.gate.weight, reader.read(f"model.layers.{i}.{block}.gate.weight"))


def test_sliding_windows_follow_transformers():
    """Mixtral: Mistral's window on every layer. Qwen3-MoE: on every layer when use_sliding_window is set
    (transformers' Qwen3MoeConfig reads neither max_window_layers nor layer_types), else none."""
    base = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 3,
            "num_attention_heads": 2, "num_experts_per_tok": 2}
    mixtral = {**base, "architectures": ["MixtralForCausalLM"], "num_local_experts": 4, "sliding_window": 32}
    assert ModelConfig.from_hf_config(mixtral).sliding_windows == (32, 32, 32)
    assert ModelConfig.from_hf_config({**mixtral, "sliding_window": None}).sliding_windows == (None,) * 3
    qwen = {**base, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4, "moe_intermediate_size": 4,
            "sliding_window": 32, "max_window_layers": 1, "layer_types": ["full_attention"] * 3}
    assert ModelConfig.from_hf_config(qwen).sliding_windows == (None,) * 3
    assert ModelConfig.from_hf_config({**qwen, "use_sliding_window": True}).sliding_windows == (32, 32, 32)
    assert ModelConfig.from_hf_config({**qwen, "use_sliding_window": True}).qk_norm


def test_whole_models_match_transformers_where_experts_get_no_token(checkpoints):
    """Ragged batches (a lone token, short and long sequences) where some experts receive no token in some layer:
    every row's logits and every layer's hidden states within 1e-4 of transformers (sdpa), float32."""
    batches = ([1], [3, 1], [1, 9, 40, 23])
    for family, path in checkpoints.items():
        runner = ModelRunner.load(path, dtype="float32")
        hf = load_reference(path, attention="sdpa")
        idle = 0
        routed = []
        hooks = [layer.mlp.gate.register_forward_hook(lambda m, args, out: routed.append(out.expert_ids))
                 for layer in runner.model.layers if isinstance(layer.mlp, SparseMoeBlock)]
        for i, lengths in enumerate(batches):
            seqs, ids, offsets = ragged(lengths, 300, seed=i)
            routed.clear()
            outs = run_model(runner, ids, offsets)
            idle += sum(runner.config.moe.num_experts - ids_.unique().numel() for ids_ in routed)
            for seq, out in zip(seqs, outs):
                logits, hidden = reference(hf, seq)
                torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=0)
                # our hidden-state layer j is block j's output, transformers' hidden_states[j] (the last: normed)
                for j, got in enumerate(out.hidden_states[:-1], start=1):
                    torch.testing.assert_close(got, hidden[j], atol=1e-4, rtol=0)
        for hook in hooks:
            hook.remove()
        assert idle > 0, family


@pytest.mark.parametrize("family", FAMILIES)
def test_model_outputs_do_not_depend_on_the_batch(family, checkpoints):
    """ModelRunner.run, float32 CPU, one thread: a sequence's logits and hidden states are the same bits alone and
    in batches where many tokens share its experts (copies of it) or not, wherever it sits. The dense decoder
    keeps this for sequences of 4 or more tokens (shorter ones alone take other matmul kernels, as in the dense
    families); the sparse blocks add no dependence on the batch."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner = ModelRunner.load(checkpoints[family], dtype="float32")
        g = torch.Generator().manual_seed(3)
        for length in (4, 13):
            probe = torch.randint(0, 300, (length,), generator=g)
            (alone,) = run_model(runner, probe, torch.tensor([0, length]))
            for copies, others in ((1, []), (30, []), (2, [5, 1, 64]), (12, [200, 3]), (0, [333])):
                seqs = [probe] * copies + [torch.randint(0, 300, (n,), generator=g) for n in others]
                for at in (0, len(seqs) // 2, len(seqs)):
                    batch = seqs[:at] + [probe] + seqs[at:]
                    offsets = torch.tensor([0] + [len(s) for s in batch]).cumsum(0)
                    got = run_model(runner, torch.cat(batch), offsets)[at]
                    assert torch.equal(got.logits, alone.logits), (length, copies, others, at)
                    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, alone.hidden_states))
    finally:
        torch.set_num_threads(previous)
