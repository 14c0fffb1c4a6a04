"""Ad-hoc: fp32 contiguous vs channels_last (and bf16 autocast) train-step time on this CPU, interleaved."""
import sys, time, statistics, torch, torch.nn.functional as F
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from resnet_lab.models import build_model
torch.set_num_threads(1)
rounds, steps = int(sys.argv[1]), int(sys.argv[2])
def make(name, fmt):
    torch.manual_seed(0)
    m = build_model(name).to(memory_format=fmt).train()
    return m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
def step(m, opt, x, y, fmt, bf16):
    x = x.contiguous(memory_format=fmt)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(m(x).float(), y)
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
for name in ("resnet-20", "resnet-56"):
    for batch in (128, 64):
        x = torch.randn(batch, 3, 32, 32); y = torch.randint(0, 10, (batch,))
        variants = {"fp32 contiguous": (torch.contiguous_format, False), "fp32 channels_last": (torch.channels_last, False)}
        if "bf16" in sys.argv: variants |= {"bf16 channels_last": (torch.channels_last, True)}
        nets = {k: make(name, f) for k, (f, _) in variants.items()}
        for k, (f, b) in variants.items(): step(*nets[k], x, y, f, b)
        times = {k: [] for k in variants}
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for k in order:
                f, b = variants[k]; t = time.perf_counter()
                for _ in range(steps): step(*nets[k], x, y, f, b)
                times[k].append((time.perf_counter() - t) / steps)
        base = times["fp32 contiguous"]
        for k in variants:
            ratios = [b / t for b, t in zip(base, times[k])]
            print(f"{name} batch {batch} {k}: {1000*statistics.median(times[k]):.0f} ms/step, speed vs contiguous {statistics.median(ratios):.2f} (min {min(ratios):.2f} max {max(ratios):.2f})", flush=True)
