"""Cost of target_ranks + entropy beside target_logprobs on the default model, in process, interleaved (issue 17).

Run: python bench/score_kinds_cost.py (prints wall and CPU seconds per forward of 4 sequences, 1280 tokens)."""
import time, torch
from service.default_model import ensure_default_model
from model import ModelRunner, OutputSpec, ReturnLogits
torch.set_num_threads(2)
r = ModelRunner.load(str(ensure_default_model()))
g = torch.Generator().manual_seed(0)
lens = [256, 384, 512, 128]
ids = torch.randint(0, r.config.vocab_size, (sum(lens),), generator=g)
off = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)))
base = OutputSpec(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True)
more = OutputSpec(return_logits=ReturnLogits.ALL, logits=False, target_logprobs=True, target_ranks=True, entropy=True)
t = {"base": [], "more": []}
r.run(ids, off, [base] * 4)
for rep in range(4):
    for name, spec in (("base", base), ("more", more)) if rep % 2 == 0 else (("more", more), ("base", base)):
        c0 = time.process_time(); w0 = time.perf_counter()
        r.run(ids, off, [spec] * 4)
        t[name].append((time.perf_counter() - w0, time.process_time() - c0))
for k, v in t.items():
    print(k, "wall", sorted(x[0] for x in v), "cpu", sorted(x[1] for x in v))
bw = min(x[0] for x in t["base"]); mw = min(x[0] for x in t["more"])
bc = min(x[1] for x in t["base"]); mc = min(x[1] for x in t["more"])
print(f"ratio min wall {mw/bw:.3f}  min cpu {mc/bc:.3f}")
