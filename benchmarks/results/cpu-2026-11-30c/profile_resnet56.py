"""Where a resnet-56 training step goes on this CPU (fp32, channels_last, batch 128, eager): torch.profiler, 2 steps."""
import torch, time, torch.nn.functional as F
from resnet_lab.models import build_model
torch.manual_seed(0)
m = build_model("resnet-56", in_channels=3, num_classes=10).to(memory_format=torch.channels_last)
opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
x = torch.randn(128,3,32,32).contiguous(memory_format=torch.channels_last); y = torch.randint(0,10,(128,))
def step():
    loss = F.cross_entropy(m(x), y); opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
for _ in range(2): step()
t=time.time(); [step() for _ in range(3)]; print("s/step", (time.time()-t)/3)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as p:
    for _ in range(2): step()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
