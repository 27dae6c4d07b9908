"""A small forward and backward through the CUDA kernels, for compute-sanitizer
(memcheck, racecheck): benchmarks/gpu_check.sh runs it under both tools. 260 queries and 300
keys: three query CTAs, the forward's three-stage key ring wrapping round at both head dims,
partial tiles at both ends of both backward kernels."""
import torch

import fastattn

torch.manual_seed(0)
for D in (64, 128):
    for causal in (False, True):
        q, k, v = (torch.randn(2, n, h, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
                   for n, h in ((260, 4), (300, 2), (300, 2)))
        kpm = torch.rand(2, 300, device="cuda") < 0.3  # scattered padding
        out = fastattn.attention(q, k, v, key_padding_mask=kpm, causal=causal, backend="cuda")
        out.float().square().sum().backward()
torch.cuda.synchronize()
print("cuda kernels ran: forward and backward, D 64 and 128, causal and not, scattered padding")
