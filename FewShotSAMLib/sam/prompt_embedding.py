"""SAM's sparse prompt embedding (points and box corners) computed in numpy.

SAM's ``PromptEncoder`` turns each point or box corner into a 256-vector: a random-Fourier positional
encoding of its normalised position plus a learnt vector for its kind (background point, foreground point,
padding, top-left or bottom-right corner). In PyTorch that is a handful of tiny operations, yet on CPU
each one waits for the intra-op thread pool, whose cores the exported decoder's threads are still holding,
which costs a large share of a decode (docs/PERFORMANCE.md). The same arithmetic in numpy never touches a
thread pool. The weights are read from the model's own prompt encoder, so every SAM family with the
reference ``PromptEncoder`` (SAM ViT-H/L/B, MobileSAM, LiteMedSAM) gets its own embedding; a test checks
it against the PyTorch module.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

PAD, BACKGROUND, FOREGROUND = -1, 0, 1


class SparsePromptEmbedding:
    """``prompt_encoder(points=..., boxes=..., masks=None)``'s sparse output, in numpy float32.

    ``points`` are (N, 2) (x, y) input-frame coordinates with ``labels`` (N,) in {-1, 0, 1}; ``box`` is
    (x0, y0, x1, y1) or None. As in the PyTorch module, a padding point is appended when there is no box.
    """

    def __init__(self, prompt_encoder: torch.nn.Module) -> None:
        def vec(module: torch.nn.Module) -> np.ndarray:
            return module.weight.detach().float().cpu().numpy().reshape(-1).copy()

        self.gaussian = (prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.detach().float().cpu()
                         .numpy().copy())  # (2, C/2)
        self.kinds = [vec(m) for m in prompt_encoder.point_embeddings]  # bg, fg, top-left, bottom-right
        self.not_a_point = vec(prompt_encoder.not_a_point_embed)
        h, w = prompt_encoder.input_image_size
        self.size = np.array([w, h], np.float32)  # x is divided by the width, y by the height
        self.dim = int(prompt_encoder.embed_dim)

    def _positional(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) pixel coordinates (already shifted to pixel centres) -> (N, C) Fourier features."""
        c = 2.0 * (xy.astype(np.float32) / self.size) - 1.0
        # c @ gaussian written out (K = 2): no BLAS call, so no thread pool either
        proj = c[:, :1] * self.gaussian[0] + c[:, 1:2] * self.gaussian[1]
        proj = np.float32(2 * np.pi) * proj
        return np.concatenate([np.sin(proj), np.cos(proj)], axis=1).astype(np.float32)

    def __call__(self, points: Optional[np.ndarray], labels: Optional[np.ndarray],
                 box: Optional[np.ndarray]) -> np.ndarray:
        """(N_tokens, C) float32: the point tokens (with the padding token when there is no box), then the
        two box-corner tokens."""
        parts = []
        if points is not None and len(points):
            xy = np.asarray(points, np.float32).reshape(-1, 2) + np.float32(0.5)
            lab = np.asarray(labels).reshape(-1)
            if box is None:
                xy = np.concatenate([xy, np.zeros((1, 2), np.float32)])
                lab = np.concatenate([lab, [PAD]])
            emb = self._positional(xy)
            emb[lab == PAD] = self.not_a_point
            emb[lab == BACKGROUND] += self.kinds[0]
            emb[lab == FOREGROUND] += self.kinds[1]
            parts.append(emb)
        if box is not None:
            corners = np.asarray(box, np.float32).reshape(2, 2) + np.float32(0.5)
            emb = self._positional(corners)
            emb[0] += self.kinds[2]
            emb[1] += self.kinds[3]
            parts.append(emb)
        if not parts:
            return np.zeros((0, self.dim), np.float32)
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
