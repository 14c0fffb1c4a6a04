"""resnet-56 fp32 channels_last, batch 128: eager vs torch.compile modes (argv[1]: eager, default or a mode), one process each."""
import torch, time, sys, torch.nn.functional as F
from resnet_lab.models import build_model
mode = sys.argv[1] if len(sys.argv) > 1 else "default"
torch.manual_seed(0)
m = build_model("resnet-56", in_channels=3, num_classes=10).to(memory_format=torch.channels_last)
opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
x = torch.randn(128,3,32,32).contiguous(memory_format=torch.channels_last); y = torch.randint(0,10,(128,))
cm = m if mode == "eager" else torch.compile(m, mode=None if mode == "default" else mode)
def step():
    loss = F.cross_entropy(cm(x), y); opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
t=time.time(); step(); print(mode, "first step", round(time.time()-t,1), flush=True)
step()
ts=[]
for _ in range(6):
    t=time.time(); step(); ts.append(time.time()-t)
ts.sort(); print(mode, "median s/step", round(ts[3],3), "img/s", round(128/ts[3],1))
