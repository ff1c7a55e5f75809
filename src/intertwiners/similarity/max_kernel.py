"""The max kernel K[i, j] = max_k X[i, k] * Y[j, k] (Lemma 5.5), fast.

Note: contrary to Lemma 5.5, this kernel is not positive semi-definite (x = (1,0), (0,1), (1,1) gives the
eigenvalue 1 - sqrt 2); see docs/similarity.md.

This is a (max, x) matrix product, which no BLAS provides. Three implementations:

* CPU, (N, d) features: a tiled, multi-threaded numba kernel. A 4 x 4 block of outputs is kept in 16
  accumulators while the inner loop runs over k (contiguous in memory), so LLVM vectorises it into
  broadcast-free SIMD multiplies and ``maxnum`` operations (reductions over k; max is associative, so the
  vectorised result is bit-identical to the naive loop). Blocks of Y rows are tiled to stay in L3, blocks
  of k to stay in L1; threads take interleaved row blocks so that the symmetric case (Y = X, only the
  upper triangle computed and mirrored) stays balanced. Compiled once and cached on disk (``cache=True``).
* Any other device (CUDA), or ``backend="torch"``: a chunked broadcast (rows_i, 1, d) * (1, rows_j, d)
  -> amax, with chunk sizes bounded by a memory budget.
* (N, C, *spatial) features: K[i, j] = max_c <X[i, c], Y[j, c]>, the inner products of the spatial maps.
  The per-channel Gram matrices come from batched BLAS (``torch.bmm``) over blocks of channels, folded
  into a running maximum, so memory stays at a few blocks of (N, M) whatever C is.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange
from numba.extending import intrinsic

from .._util import start_numba_threads
from ._validate import to_features

# Products are exact whatever the flags; only the order of the max reduction changes, and max is
# associative. NaN/Inf never get here (inputs are validated), so "no NaN/Inf" is a true promise.
_FASTMATH = {"nnan", "ninf", "nsz", "reassoc", "arcp", "contract"}

# Memory budget (bytes) for the temporaries of the torch / BLAS paths.
_TEMP_BYTES = 1 << 27


@intrinsic
def _fmax(typingctx, a, b):
    """llvm.maxnum with fast-math flags: the form of max that LLVM's loop vectoriser turns into SIMD."""
    if a != b or not isinstance(a, numba.types.Float):
        return None

    def codegen(context, builder, signature, args):
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [t], ir.FunctionType(t, [t, t]))
        return builder.call(fn, args, fastmath=("nnan", "ninf", "nsz", "reassoc"))

    return a(a, b), codegen


@njit(cache=True, fastmath=_FASTMATH, inline="never")
def _micro_4x4(X, Y, i, j, k0, k1):
    """max over k in [k0, k1) of X[i+a, k] * Y[j+b, k] for a, b in 0..3, as a 16-tuple (row-major)."""
    x0 = X[i, k0:k1]
    x1 = X[i + 1, k0:k1]
    x2 = X[i + 2, k0:k1]
    x3 = X[i + 3, k0:k1]
    y0 = Y[j, k0:k1]
    y1 = Y[j + 1, k0:k1]
    y2 = Y[j + 2, k0:k1]
    y3 = Y[j + 3, k0:k1]
    p0, p1, p2, p3 = x0[0], x1[0], x2[0], x3[0]
    q0, q1, q2, q3 = y0[0], y1[0], y2[0], y3[0]
    a00, a01, a02, a03 = p0 * q0, p0 * q1, p0 * q2, p0 * q3
    a10, a11, a12, a13 = p1 * q0, p1 * q1, p1 * q2, p1 * q3
    a20, a21, a22, a23 = p2 * q0, p2 * q1, p2 * q2, p2 * q3
    a30, a31, a32, a33 = p3 * q0, p3 * q1, p3 * q2, p3 * q3
    # k starts at 1 so that LLVM sees a non-negative induction variable (no wrap-around checks).
    for k in range(1, k1 - k0):
        p0, p1, p2, p3 = x0[k], x1[k], x2[k], x3[k]
        q0, q1, q2, q3 = y0[k], y1[k], y2[k], y3[k]
        a00 = _fmax(a00, p0 * q0)
        a01 = _fmax(a01, p0 * q1)
        a02 = _fmax(a02, p0 * q2)
        a03 = _fmax(a03, p0 * q3)
        a10 = _fmax(a10, p1 * q0)
        a11 = _fmax(a11, p1 * q1)
        a12 = _fmax(a12, p1 * q2)
        a13 = _fmax(a13, p1 * q3)
        a20 = _fmax(a20, p2 * q0)
        a21 = _fmax(a21, p2 * q1)
        a22 = _fmax(a22, p2 * q2)
        a23 = _fmax(a23, p2 * q3)
        a30 = _fmax(a30, p3 * q0)
        a31 = _fmax(a31, p3 * q1)
        a32 = _fmax(a32, p3 * q2)
        a33 = _fmax(a33, p3 * q3)
    return (a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _store(K, i, j, r, first, transpose):
    for a in range(4):
        for b in range(4):
            v = r[4 * a + b]
            if transpose:
                if first or v > K[j + b, i + a]:
                    K[j + b, i + a] = v
            else:
                if first or v > K[i + a, j + b]:
                    K[i + a, j + b] = v


@njit(cache=True, fastmath=_FASTMATH, parallel=True)
def _max_product(X, Y, K, row_order, symmetric, tile_j, block_k):
    """K[i, j] = max_k X[i, k] Y[j, k] for X (n, d), Y (m, d), n and m multiples of 4, K (n, m) output.

    ``row_order`` permutes the row blocks so that the static split of ``prange`` balances the threads;
    with ``symmetric`` (Y is X) only blocks with bj >= bi are computed and mirrored.
    """
    n_bi = X.shape[0] // 4
    n_bj = Y.shape[0] // 4
    d = X.shape[1]
    for jt in range(0, n_bj, tile_j):
        jt1 = min(n_bj, jt + tile_j)
        for k0 in range(0, d, block_k):
            k1 = min(d, k0 + block_k)
            first = k0 == 0
            for p in prange(n_bi):
                bi = row_order[p]
                start = max(jt, bi) if symmetric else jt
                for bj in range(start, jt1):
                    r = _micro_4x4(X, Y, 4 * bi, 4 * bj, k0, k1)
                    _store(K, 4 * bi, 4 * bj, r, first, False)
                    if symmetric and bj != bi:
                        _store(K, 4 * bi, 4 * bj, r, first, True)


def _pad_rows(a: np.ndarray) -> np.ndarray:
    extra = (-a.shape[0]) % 4
    if extra == 0:
        return np.ascontiguousarray(a)
    return np.concatenate([a, np.zeros((extra, a.shape[1]), dtype=a.dtype)])


def max_product_numba(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """(N, d), (M, d) float32/float64 NumPy -> (N, M): max_k x[i, k] y[j, k] on the CPU (numba)."""
    symmetric = y is None
    xp = _pad_rows(x)
    yp = xp if symmetric else _pad_rows(y.astype(x.dtype, copy=False))
    n_bi = xp.shape[0] // 4
    threads = start_numba_threads()
    row_order = np.concatenate([np.arange(r, n_bi, threads) for r in range(threads)]).astype(np.int64)
    item = xp.dtype.itemsize
    block_k = int(max(64, 2048 // item))                   # 4 rows x block_k fit in half of L1
    k_eff = min(block_k, xp.shape[1])
    tile_j = int(max(1, (4 << 20) // (4 * k_eff * item)))  # Y tile of 4*tile_j rows ~ 4 MiB (L3)
    out = np.empty((xp.shape[0], yp.shape[0]), dtype=xp.dtype)
    _max_product(xp, yp, out, row_order, symmetric, tile_j, block_k)
    return out[: x.shape[0], : (x if symmetric else y).shape[0]]


def max_product_torch(x: torch.Tensor, y: torch.Tensor | None = None,
                      temp_bytes: int = _TEMP_BYTES) -> torch.Tensor:
    """(N, d), (M, d) tensors -> (N, M) by chunked broadcasting, on the tensors' device."""
    y = x if y is None else y
    n, d = x.shape
    m = y.shape[0]
    out = torch.empty((n, m), dtype=x.dtype, device=x.device)
    per_row = max(1, d * x.element_size())
    cj = max(1, min(m, int((temp_bytes // per_row) ** 0.5)))
    ci = max(1, min(n, temp_bytes // (per_row * cj)))
    for i in range(0, n, ci):
        xi = x[i:i + ci, None, :]
        for j in range(0, m, cj):
            out[i:i + ci, j:j + cj] = (xi * y[None, j:j + cj, :]).amax(-1)
    return out


def max_inner_over_channels(x: torch.Tensor, y: torch.Tensor | None = None,
                            temp_bytes: int = _TEMP_BYTES, row_blocks: int | None = None) -> torch.Tensor:
    """x (N, C, S), y (M, C, S) -> (N, M): max over channels c of <x[i, c, :], y[j, c, :]>.

    The per-channel Gram matrices (C, N, M) come from batched matmuls over blocks of channels and are
    folded into a running maximum; memory is bounded by ``temp_bytes`` (at least one channel) plus the
    (N, M) result. For
    y = None (K symmetric) rows are split into ``row_blocks`` blocks and only blocks on or above the
    diagonal are computed ((R + 1) / 2R of the work), then mirrored.
    """
    sym = y is None
    n = x.shape[0]
    # channel-major copies (C, N, S): contiguous operands for every batched matmul (measured faster
    # than letting bmm gather from strided views block after block)
    xc = x.transpose(0, 1).contiguous()
    if row_blocks is None:
        row_blocks = 4 if (sym and n >= 256) else 1
    c = xc.shape[0]
    m = n if sym else y.shape[0]
    if not sym or row_blocks <= 1:
        work = _workspace(c, n, m, temp_bytes, xc)
        return _max_inner_block(xc, xc if sym else y.transpose(0, 1).contiguous(), work)
    out = torch.empty((n, n), dtype=x.dtype, device=x.device)
    edges = [round(n * r / row_blocks) for r in range(row_blocks + 1)]
    # one workspace for every block: fresh multi-megabyte temporaries cost page faults, not flops
    work = _workspace(c, edges[1] - edges[0] + 1, n, temp_bytes, xc)
    for r0, r1 in zip(edges[:-1], edges[1:]):
        out[r0:r1, r0:] = _max_inner_block(xc[:, r0:r1], xc[:, r0:], work)
    for r0, r1 in zip(edges[:-1], edges[1:]):
        out[r1:, r0:r1] = out[r0:r1, r1:].T
    return out


def _workspace(c: int, n: int, m: int, temp_bytes: int, like: torch.Tensor) -> torch.Tensor:
    """A flat buffer for up to (cb, n, m) Gram blocks plus one (n, m) block maximum."""
    cb = max(1, min(c, temp_bytes // max(1, n * m * like.element_size())))
    return torch.empty((cb + 1) * n * m, dtype=like.dtype, device=like.device)


def _max_inner_block(xc: torch.Tensor, yc: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """xc (C, n, S), yc (C, m, S) -> (n, m): running max over channel blocks of batched Gram blocks,
    with temporaries carved out of the flat ``work`` buffer."""
    c, n, _ = xc.shape
    m = yc.shape[1]
    cb = max(1, min(c, work.numel() // (n * m) - 1))
    buf = work[: cb * n * m].view(cb, n, m)
    block_max = work[cb * n * m: (cb + 1) * n * m].view(n, m)
    out = None
    for c0 in range(0, c, cb):
        c1 = min(c, c0 + cb)
        g = buf[: c1 - c0]
        torch.bmm(xc[c0:c1], yc[c0:c1].transpose(1, 2), out=g)
        if out is None:
            out = torch.amax(g, 0)
        else:
            torch.amax(g, 0, out=block_max)
            torch.maximum(out, block_max, out=out)
    return out


def max_gram(x: torch.Tensor, y: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The max kernel between validated tensors (N, d) or (N, C, *spatial); returns a tensor (N, M).

    backend: ``auto`` (numba on CPU for (N, d), torch otherwise), ``numba`` or ``torch``.
    """
    if backend not in ("auto", "numba", "torch"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'torch', got {backend!r}")
    if y is not None and y.dtype != x.dtype:
        dt = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(dt), y.to(dt)
    if x.ndim > 2:
        xs = x.reshape(x.shape[0], x.shape[1], -1)
        ys = None if y is None else y.reshape(y.shape[0], y.shape[1], -1)
        if xs.shape[2] > 1:
            return max_inner_over_channels(xs, ys)
        x, y = xs[:, :, 0], None if ys is None else ys[:, :, 0]
    use_numba = backend == "numba" or (backend == "auto" and x.device.type == "cpu")
    if use_numba:
        if x.device.type != "cpu":
            raise ValueError("backend='numba' runs on the CPU; move the features there or use backend='torch'")
        xn = x.detach().contiguous().numpy()
        yn = None if y is None else y.detach().contiguous().numpy()
        return torch.from_numpy(max_product_numba(xn, yn))
    return max_product_torch(x, y)


def max_kernel(X, Y=None, *, backend: str = "auto", device=None):
    """The max kernel of Lemma 5.5: K[i, j] = max_k X[i, k] * Y[j, k] (Y defaults to X).

    X (N, d) and Y (M, d), NumPy arrays or torch tensors. For (N, C, *spatial) features the maximum runs
    over channels of the inner products of the spatial maps: K[i, j] = max_c <X[i, c], Y[j, c]>.
    No normalisation happens here (G_ReLU-CKA first centres and unit-normalises each column/channel:
    see :func:`intertwiners.similarity.grelu_cka`). Returns an (N, M) array of the type of X (NumPy in,
    NumPy out; a tensor stays on its device), float64 for float64 input, float32 otherwise.
    ``device`` moves tensors there first (e.g. ``"cuda"``); the numba kernel serves CPU (N, d) input.
    """
    from .._util import resolve_device
    dev = None if device is None else resolve_device(device)
    x = to_features(X, "X", dev)
    y = None
    if Y is not None:
        y = to_features(Y, "Y", dev if dev is not None else x.device)
        if y.shape[1:] != x.shape[1:]:
            raise ValueError(f"the max kernel pairs coordinates: X has feature shape {tuple(x.shape[1:])} and "
                             f"Y {tuple(y.shape[1:])}; they must be equal")
    _check_no_overflow(x, x if y is None else y)
    k = max_gram(x, y, backend=backend)
    return k.cpu().numpy() if isinstance(X, np.ndarray) else k


def _check_no_overflow(x: torch.Tensor, y: torch.Tensor) -> None:
    """The max kernel is not scale invariant: its entries are products (sums of products for spatial maps).
    ValueError when they could exceed the dtype's range, instead of returning inf."""
    bound = float(x.abs().amax()) * float(y.abs().amax())
    if x.ndim > 2:
        bound *= float(np.prod(x.shape[2:]))
    limit = float(torch.finfo(torch.promote_types(x.dtype, y.dtype)).max)
    if not bound < limit:
        raise ValueError(f"max kernel: products of the features reach about {bound:.3g}, beyond the range of "
                         f"{torch.promote_types(x.dtype, y.dtype)} ({limit:.3g}); pass float64 features or rescale "
                         "them")
