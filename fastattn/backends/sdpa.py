"""Backend `sdpa`: torch's own fused attention kernels behind fastattn's contract.

Through the aten ops that have a separate backward: on the CPU
`_scaled_dot_product_flash_attention_for_cpu`; on a GPU the first of these that torch's own
checks (torch.backends.cuda.can_use_*_attention) accept: cuDNN's for 16-bit inputs with D <= 128
(the fastest on an H200: benchmarks/results/2026-11-26-h200-9bb372e), FlashAttention-2's, the
memory-efficient kernel (the only one for fp32). torch's checks read tensors, CUDA ones only:
dispatch asks them about CUDA stand-ins of the Problem's shape (without a GPU it cannot, and
judges by head dims alone), outside what torch.compile traces; each call asks again, once per
kind of call (cached by everything the checks read), about its own tensors, whose device,
layout and exact lengths may differ; the backward gets the forward's answer. The lse is
fastattn's (natural log, float32, (B, H, Nq) contiguous), out has empty_out's layout, the
gradients come from the matching aten backward.

What it declines, and why: torch's kernels give a query that sees no key lse 0 (CPU) or NaN
(GPU), where fastattn promises zeros and lse = -inf, so it takes only calls in which every query
sees a key, provably and without looking at the data: no padding mask and no attn_mask (either
may hide every key of a row), with at least one key. No causal mask: torch's kernels multiply the
keys it hides by p = 0, so a NaN in a future value reaches earlier rows, where fastattn promises
that what a mask hides never reaches a result (and with scale <= 0 they give NaN). Dropout draws
torch's own random stream, which fastattn's op cannot hand on to the backward; packed sequences and
KV-cache decoding have no such ops. On a GPU, what torch's checks refuse. An empty query takes no torch kernel
(its CPU kernel divides by Nq = 0). None of this is a limit of fastattn's own kernels, which `auto` falls back to.
"""
from __future__ import annotations

import torch

from ..call import Call
from .base import Backend, Capabilities, Problem, empty_lse, empty_out, out_strides

aten = torch.ops.aten


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


# torch.backends.cuda's check for each kernel, looked up when asked (tests put fakes there)
_CAN_USE = {"cudnn": "can_use_cudnn_attention", "flash": "can_use_flash_attention",
            "efficient": "can_use_efficient_attention"}


def cuda_kernels(dtype: torch.dtype, head_dim: int) -> tuple[str, ...]:
    """The CUDA kernels ("cudnn", "flash", "efficient") the backend would run, in its order of
    preference, before torch has its say."""
    if head_dim % 8 or head_dim > 256:  # F.scaled_dot_product_attention pads D to 8s for these ops; we do not
        return ()
    if dtype == torch.float32:
        return ("efficient",)
    return ("cudnn", "flash", "efficient") if head_dim <= 128 else ("flash", "efficient")


def torch_kernel(device: str, dtype: torch.dtype, head_dim: int, gqa: bool, cudnn: bool) -> str | None:
    """The backend's first choice of kernel ("flash", "cudnn", "efficient") for a call, or None,
    for benchmark records made before it existed, which time torch's kernels by name
    (fastattn.bench.dispatch_sweep): cudnn, whether their torch had cuDNN's attention; gqa,
    grouped-query, which their torch's memory-efficient kernel did not take."""
    if device == "cpu":
        return "flash"
    kernels = [kernel for kernel in cuda_kernels(dtype, head_dim)
               if (cudnn or kernel != "cudnn") and not (gqa and kernel == "efficient")]
    return kernels[0] if kernels else None


def torch_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """The first of cuda_kernels that torch's checks accept for q, k, v on the current device, or
    None. Asked as for training: the forward cannot tell whether a backward follows (it runs with
    grad mode off), and the backward, which asks again, must get the forward's kernel."""
    with torch.enable_grad():  # an inference tensor takes no gradient, and never gets a backward
        params = torch.backends.cuda.SDPAParams(q.detach().requires_grad_(not q.is_inference()), k, v, None, 0.0,
                                                False, k.shape[1] != q.shape[1])
        return next((kernel for kernel in cuda_kernels(q.dtype, q.shape[-1])
                     if getattr(torch.backends.cuda, _CAN_USE[kernel])(params)), None)


@torch._dynamo.assume_constant_result  # makes tensors and asks torch: run, not traced
def problem_choice(device: str, dtype: torch.dtype, head_dim: int, nq: int, nk: int, gqa: bool) -> str | None:
    """torch_choice for stand-ins of a Problem on `device`: batch 1, one kv head (two query heads
    for GQA), the length buckets."""

    def stand_in(heads: int, n: int) -> torch.Tensor:
        # One row of memory: the checks read the last stride and the offset, not the data
        return torch.empty(head_dim, dtype=dtype, device=device).expand(1, heads, n, head_dim)

    k = stand_in(1, nk)
    return torch_choice(stand_in(2 if gqa else 1, nq), k, k)


# torch's answers by everything its checks read, its switches (enable_*_sdp, deterministic
# algorithms) included: a backward gets its forward's answer unless a switch moved in between
_CHOICES: dict[tuple, str | None] = {}


def _kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """torch_choice for a call's own tensors, kept by everything torch's checks read of them (and
    asked on q's device: they read the current device's properties)."""
    # Offsets mod 8 items: the alignment check reads offset * item size mod at most 16 bytes
    cuda = torch.backends.cuda
    key = (q.get_device(), q.dtype, q.shape, k.shape, q.stride(), k.stride(), v.stride(), q.storage_offset() % 8,
           k.storage_offset() % 8, v.storage_offset() % 8, q.is_inference(), cuda.cudnn_sdp_enabled(),
           cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), torch.are_deterministic_algorithms_enabled())
    try:
        kernel = _CHOICES[key]
    except KeyError:
        if len(_CHOICES) >= 4096:  # shapes x layouts seen; then start over
            _CHOICES.clear()
        with torch.cuda.device(q.get_device()):
            kernel = _CHOICES[key] = torch_choice(q, k, v)
    if kernel is None:
        raise RuntimeError(f"sdpa: torch's checks (torch.backends.cuda.can_use_*_attention) refuse its "
                           f"{', '.join(cuda_kernels(q.dtype, q.shape[-1]))} kernels for this call (q "
                           f"{tuple(q.shape)} {q.dtype} on {q.device}, k {tuple(k.shape)}), "
                           f"though they took dispatch's stand-ins for it: name another backend")
    return kernel


class SdpaBackend(Backend):
    name = "sdpa"
    caps = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        max_head_dim=256,
        mask_kinds=frozenset(),
        dropout=False,
        varlen=False,
        decode=False,
    )

    def __init__(self) -> None:
        super().__init__()
        # Where dispatch's stand-ins for a CUDA call live: torch's checks refuse tensors on any other
        # device, meta included (check_all_tensors_on_device), and without a GPU they have nothing
        # to say about one: then dispatch judges by cuda_kernels alone, and a call cannot happen
        self.stand_in_device = "cuda" if torch.cuda.is_available() else None

    def reasons(self, problem: Problem) -> list[str]:
        why = super().reasons(problem._replace(mask_kind=None))
        if problem.key_padding:
            why.append("a padding mask may leave a query no key, where torch's kernels give lse 0 or NaN")
        if problem.mask_kind is not None:
            why.append("an attn_mask may leave a query no key, where torch's kernels give lse 0 or NaN")
        if problem.nk == 0:
            why.append("no keys: torch's kernels give lse 0 or NaN")
        if problem.causal:
            why.append("causal: torch's kernels multiply a future key's value by p = 0, so a NaN there reaches "
                       "earlier rows (and scale <= 0 gives NaN)")
        if problem.device == "cuda" and not problem.aligned:
            why.append("torch's CUDA kernels read 16-byte aligned rows (unit head-dim stride, strides in 8s)")
        if problem.device == "cuda":
            kernels = cuda_kernels(problem.dtype, problem.head_dim)
            if not kernels:
                why.append("torch's CUDA kernels take head dims that are multiples of 8 up to 256")
            elif not why and self.stand_in_device and problem_choice(
                    self.stand_in_device, problem.dtype, problem.head_dim, problem.nq, problem.nk,
                    problem.gqa) is None:
                why.append(f"torch's checks (torch.backends.cuda.can_use_*_attention) refuse its "
                           f"{', '.join(kernels)} kernels for this call")
        return why

    def forward(self, q, k, v, call: Call):  # no masks, never causal: see reasons
        return self._forward(q, k, v, call.scale)

    def _forward(self, q, k, v, scale: float):
        q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
        B, H, Nq, D = q.shape
        if q.numel() == 0:  # no query: torch's CPU kernel divides by Nq = 0 (SIGFPE), and B or H = 0 fails
            return empty_out(q), empty_lse(q)
        if q.device.type == "cpu":
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
            # that kernel gives a query holding NaN or inf zeros and lse 0: non-finite in, non-finite out
            seen_bad = ~torch.isfinite(q).all(-1)
            out.masked_fill_(seen_bad[..., None], float("nan"))
            lse.masked_fill_(seen_bad, float("nan"))
        else:
            kernel = _kernel(q, k, v)
            if kernel == "cudnn":
                out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                     scale=scale)[:2]
            elif kernel == "flash":
                out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
            else:
                out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False,
                                                                        scale=scale)[:2]
        # cuDNN's lse is (B, H, Nq, 1), the memory-efficient kernel's padded to 32 rows
        lse = lse.reshape(B, H, -1)[:, :, :Nq].contiguous()
        if out.stride() != out_strides(q):  # the layout the op's fake promises
            out = torch.empty_strided(out.shape, out_strides(q), dtype=out.dtype, device=out.device).copy_(out)
        return out, lse

    def backward(self, dout, dlse, q, k, v, out, lse, call: Call):
        scale = call.scale
        if q.numel() == 0:  # no query, so no key or value reaches the output
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
        dq, dk, dv = self._backward(dout, q, k, v, out, lse, scale)
        if dlse is not None:  # torch's backwards have no lse gradient: see _lse_gradient
            dq_lse, dk_lse = self._lse_gradient(dlse, q, k, scale)
            dq, dk = dq + dq_lse, dk + dk_lse
        return dq.contiguous(), dk.contiguous(), dv.contiguous()

    def _backward(self, dout, q, k, v, out, lse, scale):
        """Gradients of out alone, through the aten backward that matches the forward."""
        B, H, Nq, D = q.shape
        Nk = k.shape[2]
        if q.device.type == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu_backward(
                _rows_contiguous(dout), q, k, v, out, lse, 0.0, False, scale=scale)
        kernel = _kernel(q, k, v)
        unused = torch.empty(0, dtype=torch.int64, device=q.device)  # the dropout RNG state: no dropout
        if kernel == "cudnn":  # cuDNN wants dO in O's layout and its lse as (B, H, Nq, 1)
            if dout.stride() != out.stride():
                dout = torch.empty_strided(out.shape, out.stride(), dtype=dout.dtype, device=dout.device).copy_(dout)
            return aten._scaled_dot_product_cudnn_attention_backward(
                dout, q, k, v, out, lse.unsqueeze(-1), unused, unused, None, None, None, Nq, Nk, 0.0, False,
                scale=scale)
        dout = _rows_contiguous(dout)
        if kernel == "flash":
            return aten._scaled_dot_product_flash_attention_backward(
                dout, q, k, v, out, lse, None, None, Nq, Nk, 0.0, False, unused, unused, scale=scale)
        padded = torch.nn.functional.pad(lse, (0, 0 if torch.version.hip else -Nq % 32))  # as the forward's lse
        return aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, padded, unused, unused, 0.0, [True, True, True, False], False,
            scale=scale)[:3]

    def _lse_gradient(self, dlse, q, k, scale):
        """The part of (dq, dk) that flows from lse. d lse_i / d s_ij = p_ij, so
        dq_i = scale dlse_i sum_j p_ij k_j and dk_j = scale sum_i p_ij dlse_i q_i: the first is
        attention with k as the values, the second that attention's dV for dO = dlse q. Two more
        kernel calls, only when the loss uses lse (return_lse)."""
        out_k, lse_k = self._forward(q, k, k, scale)  # lse_k: the forward's lse
        dq_scaled = dlse[..., None].to(q.dtype) * q
        _, _, dk = self._backward(dq_scaled, q, k, k, out_k, lse_k, scale)
        dq = (scale * dlse[..., None] * out_k.float()).to(q.dtype)
        return dq, (scale * dk.float()).to(k.dtype)
