"""Square matrices that split into independent blocks (attention elements: one block per head, permuted).

A dense group element acts on a parameter as a matrix product. For an attention element, M is
``(P ⊗ I)·blockdiag(A_1..A_h)``: n²/h of its n² entries are non-zero and it splits into h independent
(d, d) blocks. :class:`BlockMatrix` keeps only the blocks, so that the product with a parameter, the
inverse and the transpose cost h small batched operations instead of n×n ones. A matrix that does not
split is one block (the dense case).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .._util import one_thread


@dataclass(frozen=True)
class BlockMatrix:
    """An (n, n) matrix T with ``T[rows[k][i, :, None], cols[k][i, None, :]] = blocks[k][i]`` for every
    group k of equal-size blocks (shapes: rows/cols (nb, b) long, blocks (nb, b, b)) and zeros elsewhere."""

    n: int
    rows: tuple
    cols: tuple
    blocks: tuple

    @staticmethod
    def of(T: torch.Tensor) -> BlockMatrix:
        """Split ``T`` (n, n) along its non-zero pattern (connected components of the bipartite row/column
        graph). A component with unequal numbers of rows and columns (a singular pattern) or a fully dense
        ``T`` gives one block."""
        n = T.shape[0]
        whole = BlockMatrix(n, (torch.arange(n)[None],), (torch.arange(n)[None],), (T[None],))
        if n <= 1 or int(torch.count_nonzero(T)) == n * n:
            return whole
        from scipy.sparse import bmat, coo_matrix
        from scipy.sparse.csgraph import connected_components

        pattern = coo_matrix((T != 0).cpu().numpy())
        n_blocks, labels = connected_components(bmat([[None, pattern], [pattern.T, None]]), directed=False)
        if n_blocks == 1:
            return whole
        row_lab, col_lab = labels[:n], labels[n:]
        order_r, order_c = np.argsort(row_lab, kind="stable"), np.argsort(col_lab, kind="stable")
        size_r = np.bincount(row_lab, minlength=n_blocks)
        if not np.array_equal(size_r, np.bincount(col_lab, minlength=n_blocks)):
            return whole
        starts = np.concatenate([[0], np.cumsum(size_r)[:-1]])
        rows, cols, blocks = [], [], []
        for b in np.unique(size_r):
            ks = np.flatnonzero(size_r == b)
            take = (starts[ks][:, None] + np.arange(b)[None, :])
            r = torch.from_numpy(order_r[take]).to(T.device)
            c = torch.from_numpy(order_c[take]).to(T.device)
            rows.append(r)
            cols.append(c)
            blocks.append(T[r[:, :, None], c[:, None, :]])
        return BlockMatrix(n, tuple(rows), tuple(cols), tuple(blocks))

    @staticmethod
    def from_blocks(n: int, parts) -> BlockMatrix:
        """From ``(rows, cols, blocks)`` groups (rows/cols (nb, b) index tensors, blocks (nb, b, b)) that
        together cover every row and column once; groups with no blocks are dropped."""
        parts = [(r, c, b) for r, c, b in parts if r.numel()]
        return BlockMatrix(n, tuple(p[0] for p in parts), tuple(p[1] for p in parts), tuple(p[2] for p in parts))

    def restrict(self, index: torch.Tensor) -> BlockMatrix | None:
        """T[index][:, index] when ``index`` is a union of whole blocks (rows and columns); None otherwise."""
        where = torch.full((self.n,), -1, dtype=torch.long)
        where[index.cpu()] = torch.arange(len(index))
        parts, covered = [], 0
        for r, c, b in zip(self.rows, self.cols, self.blocks):
            wr, wc = where[r.cpu()], where[c.cpu()]
            inside_r, inside_c = (wr >= 0).all(1), (wc >= 0).all(1)
            if bool(((wr >= 0).any(1) & ~inside_r).any()) or bool(((wc >= 0).any(1) & ~inside_c).any()) \
                    or not torch.equal(inside_r, inside_c):
                return None     # a block cut by the index set, or rows kept without their columns
            keep = inside_r
            parts.append((wr[keep].to(r.device), wc[keep].to(c.device), b[keep.to(b.device)]))
            covered += int(wr[keep].numel())
        if covered != len(index):
            return None
        return BlockMatrix.from_blocks(len(index), parts)

    def inverse(self) -> BlockMatrix:
        """T^-1: each block inverted, rows and columns swapped (RuntimeError when a block is singular)."""
        with one_thread():
            inv = tuple(torch.linalg.inv(b) for b in self.blocks)
        return BlockMatrix(self.n, self.cols, self.rows, inv)

    def transpose(self) -> BlockMatrix:
        return BlockMatrix(self.n, self.cols, self.rows, tuple(b.mT for b in self.blocks))

    def to(self, device, dtype) -> BlockMatrix:
        return BlockMatrix(self.n, tuple(r.to(device) for r in self.rows), tuple(c.to(device) for c in self.cols),
                           tuple(b.to(device, dtype) for b in self.blocks))

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        """T @ X for X of shape (n, m): one batched product per block size."""
        Y = torch.empty_like(X)
        for r, c, b in zip(self.rows, self.cols, self.blocks):
            Y[r.reshape(-1)] = torch.bmm(b, X[c]).reshape(-1, X.shape[1])
        return Y

    def dense(self) -> torch.Tensor:
        T = torch.zeros(self.n, self.n, dtype=self.blocks[0].dtype, device=self.blocks[0].device)
        for r, c, b in zip(self.rows, self.cols, self.blocks):
            T[r[:, :, None], c[:, None, :]] = b
        return T
