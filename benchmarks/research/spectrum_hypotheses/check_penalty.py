import torch; torch.set_num_threads(1)
from specexp import penalty
from powerlaw_fast import spec_penalty
import inspect
print(inspect.signature(spec_penalty))
torch.manual_seed(0)
x = torch.randn(300, 64, dtype=torch.float64) @ torch.randn(64,64, dtype=torch.float64)
V = torch.linalg.eigh(torch.cov(x.T))[1].flip(1)
x1 = x.clone().requires_grad_(True); x2 = x.clone().requires_grad_(True)
R1,_,_ = penalty(x1, V, beta=2.0, tau=10, alpha=1.0, norm='mean', form='paper', kappa_grad=False)
R2 = spec_penalty(x2, V, alpha=1.0, tau=10, beta=2.0)
R1.backward(); R2.backward()
print(float(R1), float(R2), float((x1.grad-x2.grad).abs().max()/x2.grad.abs().max()))
