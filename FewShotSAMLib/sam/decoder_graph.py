"""The SAM mask decoder rewritten for export (ONNX Runtime, OpenVINO): same values as the family's
``predict_masks``, laid out so that the runtimes do no large transposes.

SAM's decoder moves the image side between layouts on every attention: the (C, h, w) embedding and its
positional encoding are transposed to (pixels, C), and each token-image attention splits its 4096 x 128
projections into 8 heads and merges them back. In the runtimes' profiles these moves cost about a quarter
of a decode (OpenVINO bfloat16: 6 of 21 ms). Here the image side stays (pixels, channels) throughout and
the heads are never split: the few prompt tokens are spread into a block-diagonal matrix (row (head, token)
keeps only that head's channels), so one matrix product with the whole image side gives every head's
scores, and a second gives every head's output already merged. The positional encoding (weights only) and
the "no mask" dense prompt are constants of the graph, so a decode without a mask input feeds only the
embedding and the prompt tokens.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Optional

import torch


def _upscaling_is_standard(decoder: torch.nn.Module) -> bool:
    """True for SAM's output upscaling: 2x2 stride-2 transposed convolution, channel LayerNorm, activation,
    2x2 stride-2 transposed convolution, activation."""
    up = list(getattr(decoder, "output_upscaling", []))
    return (len(up) == 5 and all(isinstance(up[i], torch.nn.ConvTranspose2d) for i in (0, 3))
            and all(tuple(up[i].kernel_size) == (2, 2) and tuple(up[i].stride) == (2, 2) for i in (0, 3))
            and all(hasattr(up[1], a) for a in ("weight", "bias", "eps")))


def _transformer_is_standard(decoder: torch.nn.Module) -> bool:
    """True for SAM's two-way transformer (the attributes the rewritten forward uses)."""
    t = getattr(decoder, "transformer", None)
    layers = getattr(t, "layers", None)
    names = ("self_attn", "norm1", "cross_attn_token_to_image", "norm2", "mlp", "norm3", "norm4",
             "cross_attn_image_to_token", "skip_first_layer_pe")
    return (layers is not None and hasattr(t, "final_attn_token_to_image") and hasattr(t, "norm_final_attn")
            and all(hasattr(layer, n) for layer in layers for n in names))


class DecoderGraph(torch.nn.Module):
    """The mask decoder returning every mask token's low-res mask and IoU score (the single-mask and
    multimask outputs are slices of these, chosen after the run).

    Inputs: ``emb`` (B, C, h, w), or (B, h*w, C) with ``pixels_major`` (a runtime that transposes the input
    itself, e.g. OpenVINO's preprocessing, is handed the graph without its transpose); ``sparse`` (B, T, C);
    ``dense`` in ``emb``'s layout, absent when the graph is built with ``no_mask`` (the prompt encoder's
    learnt "no mask" vector, then a constant). ``pe``, the positional encoding of the grid (1, C, h, w),
    is a constant.

    SAM's output upscaling (two 2x2 stride-2 transposed convolutions around a channel LayerNorm) is computed
    as two matrix products on the (pixels, channels) output: such a convolution maps each input pixel to its
    own 2x2 output block, a per-pixel linear map followed by a rearrangement of pixels. The mask tokens'
    products are taken before the pixels are rearranged, so only the masks are moved, not 32 channels.
    A decoder of another structure runs its own ``predict_masks`` inside the graph instead.
    """

    def __init__(self, decoder: torch.nn.Module, pe: torch.Tensor, *, pixels_major: bool = False,
                 no_mask: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.decoder = decoder
        self.pixels_major = pixels_major
        _, channels, self.h, self.w = pe.shape
        self.register_buffer("pe", pe.detach().reshape(1, channels, -1).transpose(1, 2).contiguous())  # (1, N, C)
        self.register_buffer("no_mask", None if no_mask is None else no_mask.detach().reshape(1, 1, -1).clone())
        self.fast = _upscaling_is_standard(decoder) and _transformer_is_standard(decoder)
        if not self.fast:
            return
        conv1, norm, self.act1, conv2, self.act2 = list(decoder.output_upscaling)
        self.c1, self.c2 = conv1.weight.shape[1], conv2.weight.shape[1]

        def per_pixel(conv: torch.nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
            # weight (in, out, 2, 2) -> (in, 2 * 2 * out) with columns ordered (row, col, out)
            w = conv.weight.detach().permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1).contiguous()
            return w, conv.bias.detach().repeat(4)

        w1, b1 = per_pixel(conv1)
        w2, b2 = per_pixel(conv2)
        self.register_buffer("w1", w1)
        self.register_buffer("b1", b1)
        self.register_buffer("w2", w2)
        self.register_buffer("b2", b2)
        self.norm = norm
        attn = decoder.transformer.final_attn_token_to_image
        self.heads = attn.num_heads
        dim = attn.internal_dim
        # (heads, dim): 1 where channel c belongs to head h
        self.register_buffer("head_of", (torch.arange(dim)[None] // (dim // self.heads)
                                         == torch.arange(self.heads)[:, None]).float())

    # ---- attention without splitting heads -------------------------------------------------------
    def _spread(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) tokens -> (B, T * heads, D): row (t, h) holds token t's channels of head h, zeros elsewhere.
        Rows are ordered token-major so that the image-to-token softmax over the tokens runs along an axis
        with the heads inside it (OpenVINO: 1.6 ms less per decode than over a last axis of a few tokens)."""
        b, t, dim = x.shape
        return (x[:, :, None] * self.head_of[None, None]).reshape(b, t * self.heads, dim)

    def _tokens_to_image(self, attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """SAM's Attention with token queries (B, T, C) and image keys and values (B, N, C)."""
        qp, kp, vp = attn.q_proj(q), attn.k_proj(k), attn.v_proj(v)
        b, t, dim = qp.shape
        scores = self._spread(qp * (1.0 / math.sqrt(dim // self.heads))) @ kp.transpose(1, 2)  # (B, T*h, N)
        out = (torch.softmax(scores, -1) @ vp).reshape(b, t, self.heads, dim)  # every head's output, all channels
        return attn.out_proj((out * self.head_of[None, None]).sum(2))  # keep each head's own channels

    def _image_to_tokens(self, attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """SAM's Attention with image queries (B, N, C) and token keys and values (B, T, C)."""
        qp, kp, vp = attn.q_proj(q), attn.k_proj(k), attn.v_proj(v)
        b, t, dim = kp.shape
        n = qp.shape[1]
        scores = qp @ self._spread(kp * (1.0 / math.sqrt(dim // self.heads))).transpose(1, 2)  # (B, N, T*h)
        weights = torch.softmax(scores.reshape(b, n, t, self.heads), 2).reshape(b, n, t * self.heads)
        return attn.out_proj(weights @ self._spread(vp))  # heads merged by the block structure

    # ---- the decoder -----------------------------------------------------------------------------
    def _image_side(self, emb: torch.Tensor, dense: Optional[torch.Tensor]) -> torch.Tensor:
        """Embedding plus dense prompt as (B, N, C)."""
        if not self.pixels_major:
            b, c = emb.shape[:2]
            emb = emb.reshape(b, c, -1)
            dense = None if dense is None else dense.reshape(dense.shape[0], c, -1)
            x = emb + (self.no_mask.transpose(1, 2) if dense is None else dense)
            return x.transpose(1, 2)
        return emb + (self.no_mask if dense is None else dense)

    def forward(self, emb: torch.Tensor, sparse: torch.Tensor, dense: Optional[torch.Tensor] = None):
        if (dense is None) != (self.no_mask is not None):
            raise ValueError("pass dense exactly when the graph was built without no_mask")
        d = self.decoder
        x = self._image_side(emb, dense)  # (B, N, C)
        if x.shape[0] != sparse.shape[0]:
            x = x.expand(sparse.shape[0], -1, -1)
        b, n, c = x.shape
        if not self.fast:
            image = x.transpose(1, 2).reshape(b, c, self.h, self.w)
            zero = torch.zeros_like(image)  # the dense prompt is already in ``image``
            return d.predict_masks(image_embeddings=image, image_pe=self.pe.transpose(1, 2).reshape(1, c, self.h, self.w),
                                   sparse_prompt_embeddings=sparse, dense_prompt_embeddings=zero)
        out_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], 0)[None].expand(sparse.shape[0], -1, -1)
        tokens = torch.cat((out_tokens, sparse), 1)
        t = d.transformer
        queries = tokens
        for layer in t.layers:  # TwoWayAttentionBlock
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + tokens
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            keys_pe = x + self.pe
            queries = layer.norm2(queries + self._tokens_to_image(layer.cross_attn_token_to_image, queries + tokens,
                                                                  keys_pe, x))
            queries = layer.norm3(queries + layer.mlp(queries))
            x = layer.norm4(x + self._image_to_tokens(layer.cross_attn_image_to_token, keys_pe, queries + tokens,
                                                      queries))
        queries = t.norm_final_attn(queries + self._tokens_to_image(t.final_attn_token_to_image, queries + tokens,
                                                                    x + self.pe, x))
        iou = d.iou_prediction_head(queries[:, 0])
        mask_tokens = queries[:, 1:1 + d.num_mask_tokens]
        h, w = self.h, self.w
        u = (x @ self.w1 + self.b1).reshape(b, h * w * 4, self.c1)  # pixel order (y, x, i, j)
        u = self.act1(torch.nn.functional.layer_norm(u, (self.c1,), self.norm.weight, self.norm.bias, self.norm.eps))
        u = self.act2(u @ self.w2 + self.b2).reshape(b, h * w * 16, self.c2)  # (y, x, i, j, k, l)
        hyper = torch.stack([d.output_hypernetworks_mlps[i](mask_tokens[:, i]) for i in range(d.num_mask_tokens)], 1)
        m = hyper.shape[1]
        masks = (u @ hyper.transpose(1, 2)).reshape(b, h, w, 2, 2, 2, 2, m)
        # output row = 4y + 2i + k, column = 4x + 2j + l
        masks = masks.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, m, 4 * h, 4 * w)
        return masks, iou


def export_decoder_onnx(decoder: torch.nn.Module, pe: torch.Tensor, *, pixels_major: bool = False,
                        no_mask: Optional[torch.Tensor] = None) -> bytes:
    """:class:`DecoderGraph` exported to ONNX in memory (about a second); inputs ``emb``, ``sparse`` (the
    number of prompt tokens a dynamic axis) and, without ``no_mask``, ``dense``."""
    graph = DecoderGraph(decoder, pe, pixels_major=pixels_major, no_mask=no_mask).eval()
    c, n = pe.shape[1], pe.shape[2] * pe.shape[3]
    emb = torch.zeros((1, n, c) if pixels_major else (1, c, pe.shape[2], pe.shape[3]))
    sparse = torch.zeros(1, 2, c)
    args = (emb, sparse) if no_mask is not None else (emb, sparse, torch.zeros_like(emb))
    names = ["emb", "sparse"] if no_mask is not None else ["emb", "sparse", "dense"]
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape checks that are constant here
        torch.onnx.export(graph, args, buffer, input_names=names, output_names=["masks", "iou"],
                          dynamic_axes={"sparse": {1: "tokens"}}, opset_version=17, dynamo=False)
    return buffer.getvalue()
