"""Every output kind of ModelRunner.run on the default model, saved for a bit comparison between two checkouts:

    PYTHONPATH=OLD python bench/output_bits.py old.pt on; PYTHONPATH=NEW python bench/output_bits.py new.pt on
    python -c "import torch; a, b = torch.load('old.pt'), torch.load('new.pt'); print([k for k in a if not torch.equal(a[k].nan_to_num(1e30), b[k].nan_to_num(1e30))])"

(on|off: prefix sharing). Sequences: three after one 150-token context, four alone (1 to 130 tokens)."""
import random, sys, torch
from pathlib import Path
from model import ModelRunner, OutputSpec, ReturnLogits, ReturnHiddenStates
out = sys.argv[1]; sharing = sys.argv[2] == "on"
path = Path.home() / ".cache/logitserve/SmolLM2-135M-Instruct"
torch.set_num_threads(2)
runner = ModelRunner.load(path, prefix_sharing=sharing)
rng = random.Random(0)
ctx = [rng.randrange(49152) for _ in range(150)]
seqs = [ctx + [rng.randrange(49152) for _ in range(n)] for n in (5, 17, 40)] + [[rng.randrange(49152) for _ in range(n)] for n in (1, 3, 77, 130)]
specs = [OutputSpec(return_logits=ReturnLogits.ALL, logits=True, target_logprobs=True, top_k=5, target_ranks=True, entropy=True),
         OutputSpec(return_logits=ReturnLogits.LAST_TOKEN, logits=False, vocab_ids=(1, 2, 300)),
         OutputSpec(return_hidden_states=ReturnHiddenStates.ALL, layers=(-1, 6), logits=False),
         OutputSpec(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True)]
res = {}
for si, spec in enumerate(specs):
    ids = torch.tensor([t for s in seqs for t in s]); offs = torch.tensor([0] + [sum(len(s) for s in seqs[:i + 1]) for i in range(len(seqs))])
    outs = runner.run(ids, offs, [spec] * len(seqs))
    for b, o in enumerate(outs):
        for k, v in vars(o).items():
            if isinstance(v, torch.Tensor):
                res[f"{si}.{b}.{k}"] = v.contiguous()
torch.save(res, out)
print(out, len(res))
