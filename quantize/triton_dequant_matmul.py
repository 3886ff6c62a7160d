"""Fused GPTQ dequantize + matmul in Triton: y = x @ W^T with W read from int32-packed qweight/qzeros.

Each program computes a [BLOCK_M, BLOCK_N] tile of y, walking in_features in BLOCK_K steps: it loads the packed
words of those input rows, unpacks the 2/4/8-bit codes, looks up every row's group through g_idx (so act-order
checkpoints work), dequantizes with that group's scale and zero point and accumulates the tile with tl.dot in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pack import check_checkpoint_format

KERNEL_BITS = (2, 4, 8)


@triton.jit
def _dequant_matmul_kernel(x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, y_ptr,
                           M, N, K,
                           stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
                           stride_ym, stride_yn,
                           ZERO_OFFSET: tl.constexpr, BITS: tl.constexpr, IEEE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    zero_shift = (offs_n % PER_WORD) * BITS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mask_kn = mask_k[:, None] & mask_n[None, :]
        words = tl.load(qweight_ptr + (offs_k // PER_WORD)[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                        mask=mask_kn, other=0)
        group = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
        scale = tl.load(scales_ptr + group[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=mask_kn, other=0.0)
        zero_words = tl.load(qzeros_ptr + group[:, None] * stride_zg + (offs_n // PER_WORD)[None, :] * stride_zn,
                             mask=mask_kn, other=0)
        codes = (words >> ((offs_k % PER_WORD) * BITS)[:, None]) & MAXQ
        zeros = ((zero_words >> zero_shift[None, :]) & MAXQ) + ZERO_OFFSET
        w = ((codes - zeros).to(tl.float32) * scale.to(tl.float32)).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """y [..., out] = x [..., in] @ W^T for a GPTQ-packed W (2/4/8 bits), in x's dtype (float16/bfloat16/float32)."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"the Triton kernel supports bits {KERNEL_BITS}, got {bits}")
    check_checkpoint_format(checkpoint_format)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    K = g_idx.numel()
    N = scales.shape[1]
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects {K}")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*x.shape[:-1], N)
    block_m = 16 if M <= 16 else 64
    block_n, block_k = 64, 32
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _dequant_matmul_kernel[grid](
        x2, qweight, scales, qzeros, g_idx, y, M, N, K,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        qzeros.stride(0), qzeros.stride(1), y.stride(0), y.stride(1),
        ZERO_OFFSET=1 if checkpoint_format == "gptq" else 0, BITS=bits, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y.reshape(*x.shape[:-1], N)
