"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs
(H = sum of x x^T over the calibration tokens), so the layer's OUTPUT on real activations moves
as little as possible. Round-to-nearest minimises the weight error instead, which is why it loses
far more perplexity at 4 bits (see the gates in tests/test_quantization.py).

Block parameters (scale, zero point) are chosen when the first column of a block is reached, from
the already error-compensated weights of that block, the usual "group size" variant. Batches of
columns are aligned to whole blocks so those parameters see every compensation made so far.
"""

from __future__ import annotations

import numpy as np

from export.quant_formats import (
    Grid,
    QuantizedWeight,
    clip_search,
    dequantize_codes,
    grid_params,
    quantize_to,
)


def _inverse_hessian_chol(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of H^-1 after dampening; escalates the damping when H is too
    ill-conditioned for the factorisation (few calibration tokens for a wide layer)."""
    h = np.asarray(h, np.float64)
    mean_diag = float(np.mean(np.diag(h))) or 1.0
    for attempt in range(6):
        hd = h + np.eye(h.shape[0]) * damp * (10 ** attempt) * mean_diag
        try:
            lower = np.linalg.cholesky(hd)
            inv = np.linalg.inv(lower)
            hinv = inv.T @ inv  # H^-1
            return np.linalg.cholesky(hinv).T  # upper
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("Hessian is not positive definite even after heavy damping")


def gptq(name: str, w: np.ndarray, h: np.ndarray, grid: Grid, *, damp: float = 0.01,
         clip: bool = False, batch: int = 128) -> QuantizedWeight:
    """Quantize w [out, in] for inputs whose Hessian is h [in, in]."""
    n, k = w.shape
    block = grid.block or k
    nb = -(-k // block)
    w = np.array(w, np.float32, copy=True)
    h = np.array(h, np.float64, copy=True)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_hessian_chol(h, damp).astype(np.float32)
    hdiag = np.diag(h).astype(np.float32)

    codes = np.zeros((n, nb * block), np.int16)
    scale = np.ones((n, nb), np.float32)
    zero = None if grid.symmetric else np.zeros((n, nb), np.float32)
    per_row = grid.block is None
    if per_row:  # one scale per output channel, from the original weights
        s0, z0 = clip_search(w, grid, hdiag) if clip else grid_params(w, grid)
        scale[:, 0] = s0
        if zero is not None and z0 is not None:
            zero[:, 0] = z0
    step = block * max(1, batch // block) if not per_row else batch
    s_cur, z_cur = scale[:, 0], None if zero is None else zero[:, 0]
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not per_row and col % block == 0:
                j = col // block
                end = min(i + block, i2 - i1)
                cur = w1[:, i:end]
                if clip:
                    s_cur, z_cur = clip_search(cur, grid, hdiag[col: col + end - i])
                else:
                    s_cur, z_cur = grid_params(cur, grid)
                scale[:, j] = s_cur
                if zero is not None and z_cur is not None:
                    zero[:, j] = z_cur
            wc = w1[:, i]
            q = quantize_to(wc[:, None], s_cur, z_cur, grid)[:, 0]
            codes[:, col] = q
            deq = dequantize_codes(q[:, None], s_cur, z_cur, grid)[:, 0]
            e = (wc - deq) / hinv1[i, i]
            w1[:, i:] -= np.outer(e, hinv1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if not grid.symmetric and nb * block > k:  # tail padding: any valid code
        codes[:, k:] = 0
    return QuantizedWeight(name, grid, codes, scale, zero, k,
                           method="gptq+clip" if clip else "gptq")
