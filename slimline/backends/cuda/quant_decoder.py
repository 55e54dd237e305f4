"""Batch-1 decoding with low-bit weights: :class:`StaticDecoder`'s step, its GEMVs read packed codes.

    decoder = QuantStaticDecoder(model, max_length=1024, bits=4, group_size=128)
    tokens = decoder.generate(prompt_1P, max_new_tokens=256)

The decoder builds the same private fused copy of the weights as :class:`StaticDecoder` (Q/K/V one
matrix, gate/up one matrix), then quantizes each matrix round-to-nearest
(:func:`slimline.quant.scheme.quantize_rtn`) and packs it in the tiled layout of
:mod:`slimline.backends.cuda.quant_gemv`; every GEMV of the step becomes ``tiled_gemv`` with the
fusions of :func:`slimline.backends.cuda.decode_kernels.gemv`:

    qkv       RMSNorm / LayerNorm prologue              (norm weight folded into the codes)
    o, down   residual added in the epilogue            (x += Q · a)
    up        norm prologue, SiLU(gate)·up / GELU       (gate and up rows interleaved)
    head      final norm prologue; int8 per channel (``head_bits=8``, default) or bf16 (``None``)

Folding the norm: the matrix quantized is ``W · diag(g)`` (g the norm's weight), so the kernel reads
x as it is and scales each output by the norm's 1/rms (LayerNorm: also the mean term, through
the rows' sums, and the norm's bias, through ``Q · diag(1/g) · b``). The prompt runs through the
dense form of the *same* numbers: the private fused weights are replaced by ``dequant(Q) ·
diag(1/g)`` (0 where g is 0), so the cache the prompt fills and the tokens the step produces come
from one quantized model. The user's model is only read.

Defaults follow issue 7's quality table: 8 bits per output channel, symmetric; 4, 3 and 2 bits in
groups of ``group_size`` (128), asymmetric. ``tune=True`` measures :data:`quant_gemv.TILED_CANDIDATES`
per weight family on the device (all layers in turn, as :meth:`StaticDecoder.tune` does).

Shape legend: C model width, F MLP width, V vocabulary, K a matrix's input width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from slimline.backends.cuda import quant_gemv as qg
from slimline.backends.cuda.decoder import StaticDecoder
from slimline.errors import ConfigError
from slimline.quant.scheme import QuantScheme, quantize_rtn

__all__ = ["QuantStaticDecoder", "QuantLayer", "quantize_matrix"]


@dataclass
class QuantLayer:
    qkv: qg.TiledWeight
    o: qg.TiledWeight
    up: qg.TiledWeight  # rows interleaved [gate_0, up_0, ...] for SiLU-gated MLPs
    down: qg.TiledWeight


def _interleave(weight_2FK: torch.Tensor) -> torch.Tensor:
    """[gate; up] (2F, K) -> rows [gate_0, up_0, gate_1, up_1, ...]."""
    F = weight_2FK.shape[0] // 2
    return weight_2FK.view(2, F, -1).transpose(0, 1).reshape(2 * F, -1)


def _deinterleave(weight: torch.Tensor) -> torch.Tensor:
    F = weight.shape[0] // 2
    return weight.view(F, 2, -1).transpose(0, 1).reshape(2 * F, -1)


@torch.no_grad()
def quantize_matrix(weight: torch.Tensor, scheme: QuantScheme, norm_weight: torch.Tensor | None = None,
                    norm_bias: torch.Tensor | None = None) -> tuple[qg.TiledWeight, torch.Tensor]:
    """(the tiled kernel's weight, the dense weight the prompt pass uses) for ``weight (N, K)``.

    With ``norm_weight`` g, ``W · diag(g)`` is quantized (the kernel then reads x raw), and the dense
    weight is ``dequant · diag(1/g)`` so that ``F.linear(norm(x), dense)`` is the same product. With
    ``norm_bias`` b (LayerNorm), the rows' sums and the bias ``dense · b`` are kept for the kernel.
    """
    w = weight.float()
    if norm_weight is not None:
        w = w * norm_weight.float()[None, :]
    quantized = quantize_rtn(w, scheme)
    tiled = qg.tile_weight(quantized)
    dequantized = quantized.dequantize(torch.float32)  # (N, K), g folded in
    if norm_weight is None:
        return tiled, dequantized.to(weight.dtype)
    g = norm_weight.float()
    dense = torch.where(g[None, :] == 0, torch.zeros_like(dequantized), dequantized / g[None, :])
    if norm_bias is not None:
        tiled.rowsum = dequantized.sum(1).contiguous()
        tiled.bias = (dense @ norm_bias.float()).contiguous()
    return tiled, dense.to(weight.dtype)


class QuantStaticDecoder(StaticDecoder):
    """:class:`StaticDecoder` whose products read ``bits``-bit codes (2, 3, 4 or 8).

    ``group_size``: codes per scale (None: one per output channel; the default is None for 8 bits,
    else 128); ``symmetric`` (default: 8 bits only); ``head_bits``: 8 (per channel, symmetric) or
    None to keep the LM head in the model's dtype.
    """

    FAMILIES = ("qkv", "o", "up", "down")

    def __init__(self, model: Any, max_length: int, *, bits: int = 4, group_size: int | None | str = "default",
                 symmetric: bool | None = None, head_bits: int | None = 8, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, graph: bool = True, tune: bool = True,
                 pdl: bool | None = None):
        if bits not in qg.TILE_BITS:
            raise ConfigError(f"QuantStaticDecoder runs {qg.TILE_BITS}-bit weights, not {bits!r}", stage="backend",
                              where="QuantStaticDecoder(bits=...)", hint="use 2, 3, 4 or 8 bits")
        if head_bits not in (None, 8):
            raise ConfigError(f"the LM head is kept in 8 bits or in the model's dtype, not {head_bits!r} bits",
                              stage="backend", where="QuantStaticDecoder(head_bits=...)", hint="use 8 or None")
        group = (None if bits == 8 else 128) if group_size == "default" else group_size
        self.scheme = QuantScheme(bits, group, bits == 8 if symmetric is None else symmetric)
        super().__init__(model, max_length, dtype=dtype, device=device, graph=graph, tune=False, pdl=pdl)
        self.quant_layers = self._quantize_layers()
        self.head_quant: qg.TiledWeight | None = None
        weights = self.weights
        if head_bits == 8:
            self.head_quant, dense = quantize_matrix(weights.head_weight, QuantScheme(8, None, True),
                                                     weights.final_norm, weights.final_bias)
            weights.head_weight = dense  # a new tensor: a tied embedding keeps its own values
        self.configs = {name: qg.DEFAULT_TILED for name in self.FAMILIES}
        self.configs["head"] = qg.DEFAULT_TILED if self.head_quant is not None else self.kernels.DEFAULT_GEMV
        head_bytes = (self.head_quant.nbytes() if self.head_quant is not None
                      else weights.head_weight.numel() * weights.head_weight.element_size())
        self.report.update({
            "quantization": {"bits": bits, "group_size": group, "symmetric": self.scheme.symmetric,
                             "method": "round-to-nearest, norm weights folded into the codes",
                             "layout": f"tiled ({qg.TILE_CODES}-code tiles, {bits} words per 32 codes)",
                             "head": "int8 per channel" if self.head_quant is not None else str(weights.dtype)},
            "weight_bytes": sum(w.nbytes() for layer in self.quant_layers
                                for w in (layer.qkv, layer.o, layer.up, layer.down)) + head_bytes,
            "dense_weight_bytes": weights.weight_bytes()})
        if tune and self.device.type == "cuda":
            self.tune()
        self.report["gemv_configs"] = {name: config.to_json() for name, config in self.configs.items()}

    def _quantize_layers(self) -> list[QuantLayer]:
        spec, scheme = self.spec, self.scheme
        gated = spec.activation == "silu_pair"
        layers = []
        for layer in self.weights.layers:
            qkv, layer.qkv = quantize_matrix(layer.qkv, scheme, layer.norm_attention, layer.norm_attention_bias)
            o, layer.o = quantize_matrix(layer.o, scheme)
            up_weight = _interleave(layer.up) if gated else layer.up
            up, dense_up = quantize_matrix(up_weight, scheme, layer.norm_mlp, layer.norm_mlp_bias)
            layer.up = _deinterleave(dense_up).contiguous() if gated else dense_up
            down, layer.down = quantize_matrix(layer.down, scheme)
            layers.append(QuantLayer(qkv, o, up, down))
        return layers

    # -- the step: every product through the tiled kernel ---------------------------------------
    def _gemv_sites(self) -> dict[str, list[Callable[[Any], Any]]]:
        spec, gemv = self.spec, qg.tiled_gemv
        norm = qg.NORM_RMS if spec.norm == "rms" else qg.NORM_LAYER
        act = qg.ACT_SILU_PAIR if spec.activation == "silu_pair" else qg.ACT_GELU
        sites: dict[str, list] = {name: [] for name in self.FAMILIES}
        for layer in self.quant_layers:
            sites["qkv"].append(lambda c, w=layer.qkv: gemv(self.x, w, self.qkv, norm=norm, eps=spec.eps, config=c,
                                                            pdl=self.pdl))
            sites["o"].append(lambda c, w=layer.o: gemv(self.attended, w, self.x, residual=self.x, config=c,
                                                        pdl=self.pdl))
            sites["up"].append(lambda c, w=layer.up: gemv(self.x, w, self.hidden, norm=norm, eps=spec.eps, act=act,
                                                          config=c, pdl=self.pdl))
            sites["down"].append(lambda c, w=layer.down: gemv(self.hidden, w, self.x, residual=self.x, config=c,
                                                              pdl=self.pdl))
        if self.head_quant is not None:
            sites["head"] = [lambda c: gemv(self.x, self.head_quant, self.logits, norm=norm, eps=spec.eps, config=c,
                                            pdl=self.pdl)]
        else:
            kernels = self.kernels
            dense_norm = kernels.NORM_RMS if spec.norm == "rms" else kernels.NORM_LAYER
            sites["head"] = [lambda c: kernels.gemv(self.x, self.weights.head_weight, self.logits, norm=dense_norm,
                                                    norm_weight=self.weights.final_norm,
                                                    norm_bias=self.weights.final_bias, eps=spec.eps, config=c,
                                                    pdl=self.pdl)]
        return sites

    def tiled_weights(self) -> dict[str, list[qg.TiledWeight]]:
        """The packed matrices by family (the head's only when it is quantized)."""
        found = {name: [getattr(layer, name) for layer in self.quant_layers] for name in self.FAMILIES}
        if self.head_quant is not None:
            found["head"] = [self.head_quant]
        return found

    def _tune_candidates(self, family: str, candidates: tuple | None) -> list:
        """``candidates`` (default :data:`quant_gemv.TILED_CANDIDATES`) that fit the family's packed
        matrix; a bf16 head tunes over the dense candidates. :meth:`StaticDecoder.tune` measures them."""
        if family == "head" and self.head_quant is None:
            return list(self.kernels.GEMV_CANDIDATES)
        weight = self.tiled_weights()[family][0]
        return [c for c in (candidates or qg.TILED_CANDIDATES) if qg.fits(weight, c)]

    @staticmethod
    def _config_key(config: Any) -> str:
        return "_".join(f"{k}{v}" for k, v in config.to_json().items())
