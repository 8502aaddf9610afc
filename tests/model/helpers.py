"""Shared helpers of the model tests: ragged batches and the transformers reference per sequence."""

from __future__ import annotations

import torch

from service.packing import pack_ids


def pack(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64 [T], offsets int64 [B+1]) of these sequences, by the server's packer."""
    ids, offsets = pack_ids([s.numpy() for s in seqs])
    return torch.from_numpy(ids), torch.from_numpy(offsets)


def ragged(lengths: list[int], vocab: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Random sequences of the given lengths, packed: (sequences, input_ids [T], input_row_offsets [B+1])."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    return seqs, *pack(seqs)


@torch.no_grad()
def reference(hf_model, seq: torch.Tensor):
    """transformers' logits [n, V] and hidden states (tuple of [n, H], last one normalized) for one sequence."""
    out = hf_model(seq[None], output_hidden_states=True)
    return out.logits[0].float(), tuple(h[0] for h in out.hidden_states)
