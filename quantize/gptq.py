"""GPTQ solver for one linear layer: plain functions on tensors.

Given W [out, in] and the layer-input Hessian H = 2/n * sum x x^T [in, in], GPTQ quantizes the input columns one by
one in a chosen order and spreads each column's rounding error over the columns not yet quantized, weighted by the
inverse Hessian (Frantar et al., 2022). The reference implementation factors H^-1 = U^T U (U upper) and applies
W[:, j] -= E[:, i] U[i, j]. Writing H = V V^T with V = U^-1 (upper) turns that recursion into
    W_upd[:, j] = W[:, j] + sum_{i<j} (W - Q)[:, i] * V[i, j] / V[j, j],
which needs one Cholesky factorisation of H instead of Cholesky + inverse + Cholesky; the quantized result is the
same. Columns are processed in blocks (lazy batch updates), in the transposed [in, out] layout so a column is a
contiguous row.

Column orders: natural; act-order (desc_act: by decreasing H diagonal, groups then follow the new order, so g_idx is
not contiguous unless static_groups); group-aware reordering (act_group_aware, GAR: columns sorted by H diagonal
inside each group and groups sorted by their largest diagonal entry, so every group stays one contiguous run and
g_idx[i] = i // group_size still holds).

A group's grid (scale, zero) is found when its first column comes up, on the group's columns as updated by every
column quantized before it (the reference does the same when groups and its 128-column blocks line up). By default
the grid's range is searched (clipping the extremes) to minimise the group's share of the GPTQ objective, with each
column weighted as the objective weights it; the reference uses the plain min/max range.
"""
from __future__ import annotations

import logging
import math

import torch

from .quantizer import (QuantizedWeight, check_bits, check_group_size, find_params, quantize,
                        round_scale_fp16, search_params)

log = logging.getLogger(__name__)

SUB_BLOCK = 16
MAX_DAMP_PERCENT = 1.0


def accumulate_hessian(H: torch.Tensor | None, n: int, inp: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Add a batch of layer inputs (any leading shape, last dim in_features) to the running Hessian.

    Keeps H = 2/n * sum_k x_k x_k^T over all n rows seen so far, in float32, on the input's device.
    Pass H=None, n=0 for the first batch. Returns (H, n).
    """
    x = inp.reshape(-1, inp.shape[-1]).to(torch.float32)
    if not all_finite(x):
        raise ValueError("layer input contains NaN or inf")
    if H is None:
        H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    elif H.shape != (x.shape[1], x.shape[1]):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match input features {x.shape[1]}")
    m = x.shape[0]
    if m == 0:
        return H, n
    H.addmm_(x.t(), x, beta=n / (n + m), alpha=2.0 / (n + m))
    return H, n + m


def all_finite(x: torch.Tensor) -> bool:
    """True if x has no NaN/inf; one sum decides in the common case (an overflowing sum falls back to a mask)."""
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def group_aware_order(diag: torch.Tensor, group_size: int) -> torch.Tensor:
    """GAR permutation (perm[new_position] = old_column): each group's columns by decreasing diag, groups by
    decreasing max diag. A partial last group is treated as a group of its own."""
    n = diag.numel()
    n_groups = math.ceil(n / group_size)
    padded = torch.full((n_groups * group_size,), -math.inf, dtype=diag.dtype, device=diag.device)
    padded[:n] = diag
    values, local = torch.sort(padded.view(n_groups, group_size), dim=1, descending=True, stable=True)
    group_order = torch.argsort(values[:, 0], descending=True, stable=True)
    base = torch.arange(n_groups, device=diag.device).unsqueeze(1) * group_size
    perm = (local + base)[group_order].reshape(-1)
    return perm[perm < n]


def upper_factor(H: torch.Tensor, order: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper-triangular float32 V with V V^T = Hp + damp * mean(diag Hp) * I, Hp = H[order][:, order] with zero
    diagonal entries (dead inputs) set to 1.

    Computed as the flipped lower Cholesky factor of the flipped matrix (one copy of H, one factorisation). If the
    damped matrix is not positive definite the damping is doubled (warning logged) until it is; ValueError once it
    would reach 100%. Returns (V, damp_percent used).
    """
    n = H.shape[0]
    reverse = order.flip(0)
    A = H.index_select(0, reverse).index_select(1, reverse).to(torch.float32)  # J Hp J
    diagonal = torch.diagonal(A)
    diagonal.masked_fill_(diagonal == 0, 1.0)
    mean_diag = diagonal.mean()
    damp = damp_percent
    diagonal.add_(damp * mean_diag)
    while True:
        lower, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            del A
            return lower.flip(0, 1), damp
        new_damp = max(2 * damp, 0.01)
        if new_damp >= MAX_DAMP_PERCENT:
            raise ValueError(f"Hessian of size {n} is not positive definite even with damp_percent={damp:.4f}")
        log.warning("Hessian not positive definite with damp_percent=%.4f; retrying with %.4f", damp, new_damp)
        diagonal.add_((new_damp - damp) * mean_diag)
        damp = new_damp


def _blocks(runs: list[tuple[int, int]], blocksize: int) -> list[list[tuple[int, int]]]:
    """Cut [0, n) into blocks of at most blocksize columns, each a list of sub-blocks of at most SUB_BLOCK columns.

    Every group run starts a sub-block, so when a group's grid is computed all earlier columns' updates have
    reached it. Consecutive small groups share a block; a group longer than blocksize spans several blocks.
    """
    chunks = [(s, min(s + blocksize, end)) for start, end in runs for s in range(start, end, blocksize)]
    blocks: list[list[tuple[int, int]]] = []
    for c0, c1 in chunks:
        if blocks and c1 - blocks[-1][0][0] <= blocksize:
            blocks[-1].append((c0, c1))
        else:
            blocks.append([(c0, c1)])
    return [[(s, min(s + SUB_BLOCK, c1)) for c0, c1 in block for s in range(c0, c1, SUB_BLOCK)]
            for block in blocks]


def _group_weight(Wt, W1, R, Vn, dV, p, e, b0, b1) -> torch.Tensor:
    """Columns p..e-1 (rows of the transposed weight) as GPTQ has updated them once columns < p are quantized:
    W + (R[:p] V[:p, p:e]) V[p:e, p:e]^-1, the loss-optimal values given the fixed columns."""
    if p == 0:
        return Wt[p:e]
    if e <= b1:
        pulled = (W1[p - b0:e - b0] - Wt[p:e]) * dV[p:e, None]
    else:
        pulled = (Vn[:p, p:e].t() @ R[:p]) * dV[p:e, None]
    V_block = Vn[p:e, p:e] * dV[None, p:e]
    eye = torch.eye(e - p, dtype=V_block.dtype, device=V_block.device)
    V_block_inv_t = torch.linalg.solve_triangular(V_block, eye, upper=True).t()  # small; then one fast GEMM
    return torch.addmm(Wt[p:e], V_block_inv_t, pulled)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = 128, sym: bool = True,
                  damp_percent: float = 0.01, desc_act: bool = False, static_groups: bool = False,
                  act_group_aware: bool = True, scale_search: bool = True, blocksize: int = 128) -> QuantizedWeight:
    """Quantize W [out, in] with GPTQ against Hessian H [in, in]; runs on W's device in float32.

    group_size -1 means one group per row; a group size that does not divide in_features gives a partial last
    group. desc_act takes precedence over act_group_aware. static_groups computes every group's grid up front on
    the unreordered weight. scale_search picks each group's grid with search_params, scoring candidates by this
    objective's per-column weights (V[j, j]^2); otherwise min/max. Scales are rounded to float16-representable values
    before use.
    """
    maxq = check_bits(bits)
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D [out, in], got shape {tuple(W.shape)}")
    out_features, n = W.shape
    if H.shape != (n, n):
        raise ValueError(f"H must be [{n}, {n}] for W of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    if not 0 <= damp_percent < MAX_DAMP_PERCENT:
        raise ValueError(f"damp_percent must be in [0, 1), got {damp_percent}")
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    gs = check_group_size(group_size, n)
    if not all_finite(W):
        raise ValueError("W contains NaN or inf")
    if not all_finite(H):
        raise ValueError("H contains NaN or inf")
    device = W.device
    H = H.to(device)
    diag = torch.diagonal(H).to(torch.float32)
    dead = diag == 0
    diag = diag.masked_fill(dead, 1.0)
    n_groups = math.ceil(n / gs)
    column_group = torch.arange(n, device=device) // gs

    if desc_act:
        perm = torch.argsort(diag, descending=True, stable=True)
    elif act_group_aware:
        perm = group_aware_order(diag, gs)
    else:
        perm = torch.arange(n, device=device)
    if desc_act and not static_groups:
        group_of_position = torch.arange(n, device=device) // gs
    else:
        group_of_position = column_group[perm]
    g_idx = torch.empty(n, dtype=torch.int32, device=device)
    g_idx[perm] = group_of_position.to(torch.int32)

    Wt = W.t()[perm].to(torch.float32).contiguous()  # [in, out]: permuted columns as contiguous rows
    if bool(dead.any()):
        Wt[dead[perm]] = 0
    V, damp = upper_factor(H, perm, damp_percent)
    dV = torch.diagonal(V).clone()
    Vn = V.div_(dV)  # Vn[i, j] = V[i, j] / V[j, j]

    def grid(x, positions):
        if scale_search:
            s, z = search_params(x.t(), bits, sym, weight=dV[positions] ** 2)
        else:
            s, z = find_params(x.t(), bits, sym)
        return round_scale_fp16(s), z

    scales = torch.zeros(n_groups, out_features, dtype=torch.float32, device=device)
    zeros = torch.zeros(n_groups, out_features, dtype=torch.float32, device=device)
    if static_groups:
        position_of = torch.argsort(perm)
        for g in range(n_groups):
            positions = position_of[g * gs:(g + 1) * gs]
            scales[g], zeros[g] = grid(Wt[positions], positions)

    positions_group = group_of_position.tolist()
    runs: list[tuple[int, int]] = []
    for p, g in enumerate(positions_group):
        if runs and positions_group[runs[-1][0]] == g:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    blocks = _blocks([(0, n)] if static_groups else runs, blocksize)
    run_ends = dict(runs)

    R = torch.zeros_like(Wt)  # residual W - Q of finished columns, [in, out]
    codes = torch.empty(n, out_features, dtype=torch.uint8, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for sub_blocks in blocks:
        b0, b1 = sub_blocks[0][0], sub_blocks[-1][1]
        W1 = Wt[b0:b1].clone()
        if b0 > 0:
            W1.addmm_(Vn[:b0, b0:b1].t(), R[:b0])
        C1 = torch.empty_like(W1)  # codes of the block
        for s0, s1 in sub_blocks:
            for p in range(s0, s1):
                j = p - b0
                g = positions_group[p]
                if not static_groups and p in run_ends:
                    e = run_ends[p]
                    scales[g], zeros[g] = grid(_group_weight(Wt, W1, R, Vn, dV, p, e, b0, b1), slice(p, e))
                q, C1[j] = quantize(W1[j], scales[g], zeros[g], maxq)
                torch.sub(Wt[p], q, out=R[p])
                if p + 1 < s1:
                    W1[j + 1:s1 - b0].addr_(Vn[p, p + 1:s1], R[p])
            if s1 < b1:
                W1[s1 - b0:].addmm_(Vn[s0:s1, s1:b1].t(), R[s0:s1])
        codes[b0:b1] = C1
        W1 += R[b0:b1] - Wt[b0:b1]  # now W_upd - Q
        loss += ((W1 * dV[b0:b1, None]) ** 2).sum(dtype=torch.float64) / 2

    invperm = torch.argsort(perm)
    dequant = (Wt - R)[invperm].t().contiguous()
    return QuantizedWeight(
        weight=dequant.to(W.dtype),
        codes=codes[invperm].t().contiguous(),
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
        loss=float(loss),
        damp_percent=damp,
    )
