"""A volume prepared for one SAM backend along one slicing axis: normalised slices in the model frame and
the cache keys of their embeddings. Shared by the engine and the research tooling (evaluation, FoB
training) so that all of them feed the encoder the very same pixels and reuse the same cached embeddings.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import Sequence

import numpy as np
import torch

from .volume import Intensity, SliceFrame, normalise, slice_frame

log = logging.getLogger(__name__)

# The logit given to model-frame pixels outside the image (the padding of a non-square slice) before a
# decoder answer is resized back to the slice: far below 0, so that they are background and the resize
# does not carry the mask into them. A Python float, so that np.where keeps the logits' float32.
OUTSIDE_LOGIT = -20.0


class PreparedVolume:
    """Normalised 3D image sliced across ``axis``, each slice mapped into the backend's model frame."""

    def __init__(self, image: np.ndarray, spacing: Sequence[float], axis: int, intensity: Intensity,
                 input_size: int) -> None:
        if image.ndim != 3:
            raise ValueError("image must be 3D")
        self.axis = int(axis)
        self.spacing = np.asarray(spacing, dtype=float)
        self.intensity = intensity
        self.slices = np.moveaxis(image, self.axis, 0)  # view: (n, rows, cols)
        self.frame: SliceFrame = slice_frame(image.shape, self.spacing, self.axis, input_size)
        self.valid = self.frame.valid()
        digest = hashlib.sha1()
        digest.update(repr((image.shape, str(image.dtype), self.spacing.round(6).tolist(), self.axis,
                            intensity.kind, round(intensity.low, 4), round(intensity.high, 4), input_size)).encode())
        # The image's bytes in C order, one first-axis slab at a time: the same digest as hashing the whole
        # array, without a full copy (hundreds of MB for a large CT).
        for slab in image:
            digest.update(np.ascontiguousarray(slab))
        self.token = digest.hexdigest()[:20]

    @functools.cached_property
    def valid_box(self) -> np.ndarray:
        """(row0, col0, row1, col1) of the model-frame pixels that hold the image (``valid``): the limit of
        a growing box, the same for every slice."""
        from .shape import mask_box

        return mask_box(self.valid)

    @property
    def n_slices(self) -> int:
        """Number of slices across the axis."""
        return int(self.slices.shape[0])

    def key(self, index: int) -> tuple:
        """Embedding-cache key of slice ``index``."""
        return ("slice", self.token, int(index))

    def model_slice(self, index: int) -> np.ndarray:
        """Slice ``index`` normalised to [0, 1] in the model frame (S, S)."""
        return self.frame.to_model(normalise(self.slices[int(index)], self.intensity))

    def frame_for_key(self, key: tuple) -> np.ndarray:
        """The cache's frame callback."""
        return self.model_slice(key[2])

    def mask_to_model(self, mask2d: np.ndarray) -> np.ndarray:
        """Native slice mask -> model-frame bool mask."""
        return self.frame.mask_to_model(mask2d)

    def encode(self, cache, indices: Sequence[int], on_encoded=None) -> None:
        """Make sure ``cache`` holds the given slices' embeddings (encoding only the missing ones, in
        batches); nothing is converted or returned, so prefetching costs nothing for cached slices."""
        cache.ensure([self.key(i) for i in indices], self.frame_for_key, on_encoded)

    def embeddings(self, cache, indices: Sequence[int], on_encoded=None) -> list[torch.Tensor]:
        """Embeddings of the given slices through ``cache`` (encoding only the missing ones)."""
        self.encode(cache, indices, on_encoded)
        return [cache.get(self.key(i)) for i in indices]
