"""A small forward and backward through the CUDA kernels, for compute-sanitizer
(memcheck, racecheck): benchmarks/gpu_check.sh runs it under both tools."""
import torch

import fastattn

torch.manual_seed(0)
for D in (64, 128):
    for causal in (False, True):
        q, k, v = (torch.randn(2, n, h, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
                   for n, h in ((130, 4), (97, 2), (97, 2)))
        kpm = torch.rand(2, 97, device="cuda") < 0.3  # scattered padding
        out = fastattn.attention(q, k, v, key_padding_mask=kpm, causal=causal, backend="cuda")
        out.float().square().sum().backward()
torch.cuda.synchronize()
print("cuda kernels ran: forward and backward, D 64 and 128, causal and not, scattered padding")
