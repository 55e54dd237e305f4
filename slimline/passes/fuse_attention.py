"""Fuse attention: ``softmax(Q·Kᵀ·scale + mask)·V`` → ``aten.scaled_dot_product_attention``.

Exact. Runs after ``canonicalize_linear`` and before ``dead_code``; it needs nothing from the
passes before it. It rewrites attention written by hand (transformers' ``eager`` attention,
slimline's reference models) into one SDPA call, which torch runs with its fused CPU/CUDA kernels
and the ONNX exporter writes as one ONNX ``Attention`` node (opset ≥ 23).

Shape letters: B batch, H query heads, Hkv key/value heads (grouped-query attention, H = Hkv·R),
R the repeat factor, L query length, S key length, E query/key head width, Ev value head width.

One site is one softmax. The rule, as pattern + check + replacement::

    pattern   product_BHLS = query_BHLE · keyT_BHES             matmul | bmm | mm | baddbmm | einsum
              scores_BHLS  = product ·c / c' + bias ...          scalar mul/div, additive float
                             .masked_fill(m, -inf) ...           masks, boolean fills (any order),
                                                                 dtype casts, clone/contiguous
              probs_BHLS   = softmax(scores, dim=-1)             → casts → dropout (inert in eval)
              out_BHLEv    = probs · value_BHSEv                 matmul | bmm | mm | einsum
    check     softmax over the last dim; the scores and probabilities feed nothing else; scales
              are constants; the masks do not depend on the scores; a fill value is -inf or so
              negative that adding it gives the same score; dtypes compatible; dropout inert
    replace   out = scaled_dot_product_attention(query, key, value, attn_mask=Σ masks, scale=c/c')
              # 1 / scale, with scale=1.0 written out for T5, which does not scale
              # Σ masks constant and causal: attn_mask=None, is_causal=True; all zero: no mask

Masks are collected into one additive float mask, in SDPA's convention (``QKᵀ·scale + mask``):
a term added before a scalar multiply is multiplied by it; ``masked_fill(x, m, v)`` and
``where(keep, x, v)`` become ``where(m, v, 0)``. That equals the original exactly when ``v`` is
``-inf`` or absorbing (``x + v == v`` for every score, e.g. ``finfo(float32).min``); a moderate
fill value such as ``-1e4`` is refused, because a row whose every key is masked would then differ.
Rows where every key is masked with ``-inf`` are NaN in eager attention and 0 in SDPA (torch's
``_safe_softmax``).

Constant masks (``Config.constant_masks``): when the mask reads no input's values, only sizes and
constants (transformers' causal mask built from ``arange`` and compares when no ``attention_mask``
is passed; the reference GPT's ``where(key_pos <= query_pos, 0, -inf)``; ViT's all-zero mask),
:mod:`slimline.passes.causal_mask` evaluates it and the site gets ``is_causal=True`` and no mask
when it is exactly causal with L == S, or no mask at all when it keeps every score. transformers'
own ``sdpa`` build does the same, and without an explicit mask CUDA can run the flash kernel.
Static shapes: proven at the one size. Dynamic shapes: proven at every accepted size when the
ranges are small (``Config.mask_check_sizes``), else checked at a sample of sizes
(``mask_sampled_sizes`` counts those sites); that module's docstring says exactly what holds.
Masks from inputs (padding masks, a decode step's ``input_pos``) stay, and so do causal masks
combined with padding.

Grouped-query attention: K/V repeated by ``repeat_kv`` (``unsqueeze → expand → reshape``) are
handed to SDPA un-repeated with ``enable_gqa=True`` (``Config.unrepeat_kv``): exact (head ``h``
reads key head ``h // R`` either way), no copies, and ~1.6× faster on CPU than the repeated form.

Export (measured with torch 2.13, onnxruntime 1.32): torch's exporter writes ONNX ``Attention``
for SDPA at opset ≥ 23 only for 4-D inputs, and ORT's CPU ``Attention`` rejects a mask whose
query dimension is broadcast (BERT's ``(B, 1, 1, S)`` padding mask). So the replacement always
has 4-D operands (3-D bmm attention gets a leading 1) and a mask whose last two dimensions are
expanded to full length (a view in torch, free). SDPA calls already in the graph are counted
(``already_sdpa``) and normalised the same way, constant masks included. An SDPA with
``is_causal=True`` exports as ``Attention(is_causal=1)``, which ORT's CPU kernel runs (also with
``enable_gqa``).

Stats count fusions per pattern (``fused_scaled_mask``, ``fused_unscaled_bias``: ``unscaled``
when the scale is 1, ``mask`` for one additive term, ``bias`` for several, ``_gqa`` when K/V were
un-repeated), ``already_sdpa``, ``normalized_sdpa`` and ``near_miss``; ``causal_from_mask`` and
``zero_mask_dropped`` count constant masks replaced, ``mask kept: <reason>`` those kept. Every
site gets a :class:`LayerDecision`, a near-miss with its reason in ``why_not``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from slimline.ir.graph import Graph, module_path, stamp
from slimline.passes.base import LayerDecision, PassContext, PassResult, Reason, tunable
from slimline.passes.causal_mask import CAUSAL, ConstantMask, classify_mask

__all__ = ["NAME", "EXACT", "TARGETS", "Config", "run", "AttentionMatch", "match_attention"]

NAME = "fuse_attention"
EXACT = True
TARGETS = {"cpu", "cuda", "onnxruntime"}

aten = torch.ops.aten

ATTENTION = "attention"
FUSED = "fused → sdpa"
ALREADY = "already sdpa"
KEPT = "kept"

# a masked_fill / where fill value at or below this is absorbing: score + fill == fill in fp32
ABSORBING_FILL = -1e30


@dataclass
class Config:
    unrepeat_kv: bool = tunable(True, (True, False),
                                "hand SDPA grouped-query K/V un-repeated (enable_gqa=True) instead "
                                "of the expand+reshape copies repeat_kv made")
    expand_mask: bool = tunable(True, (True, False),
                                "expand a mask's broadcast query/key dimension to full length "
                                "(a view; ORT's CPU Attention needs it)")
    normalize_sdpa: bool = tunable(True, (True, False),
                                   "give SDPA calls already in the graph the same 4-D, full-mask "
                                   "form the exporter and ORT need")
    constant_masks: bool = tunable(True, (True, False),
                                   "a mask computed from sizes and constants only: drop it when it "
                                   "keeps every score, use is_causal=True when it is exactly causal "
                                   "(either lets CUDA run the flash kernel)")
    mask_check_sizes: int = tunable(256, (16, 256, 4096),
                                    "dynamic shapes: check a constant mask at every accepted size "
                                    "when there are at most this many, else at a sample of them")


# ---------------------------------------------------------------------------------------------
# op families

_SCORE_PRODUCTS = {aten.matmul.default, aten.bmm.default, aten.mm.default, aten.baddbmm.default,
                   aten.einsum.default}
_VALUE_PRODUCTS = {aten.matmul.default, aten.bmm.default, aten.mm.default, aten.einsum.default}
_SOFTMAXES = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.to.dtype_layout}
_IDENTITIES = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default}
_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default}
_SDPA = aten.scaled_dot_product_attention.default
_OTHER_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu.default,
               aten._scaled_dot_product_flash_attention.default,
               aten._scaled_dot_product_efficient_attention.default,
               aten._scaled_dot_product_cudnn_attention.default}
_ASSERTS = {aten._assert_tensor_metadata.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
          aten.unsqueeze.default, aten.squeeze.dim, aten.transpose.int, aten.permute.default,
          aten.expand.default}


def _is_call(node: Any, targets: set | None = None) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and \
        (targets is None or node.target in targets)


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _users(node: fx.Node) -> list[fx.Node]:
    """Users that compute something: export's dtype asserts do not count."""
    return [user for user in node.users if user.target not in _ASSERTS]


def _op_name(node: fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", str(target)).replace(".default", "")


# ---------------------------------------------------------------------------------------------
# the match


@dataclass
class MaskTerm:
    """One additive term of the mask: ``tensor`` (a float node), or ``where(fill_where, fill, 0)``."""

    tensor: fx.Node | None = None
    fill_where: fx.Node | None = None  # bool node: True where the fill value replaces the score
    fill_where_negated: bool = False   # the bool node marks the kept positions instead
    fill: float = 0.0
    factor: float = 1.0                # scalars applied after the term was added
    negate: bool = False


@dataclass
class AttentionMatch:
    """A matched site: the nodes it spans and what the SDPA call needs."""

    softmax: fx.Node
    score_product: fx.Node
    value_product: fx.Node
    query: fx.Node
    key: fx.Node                      # (.., S, E) or, when key_is_transposed, (.., E, S)
    key_is_transposed: bool
    value: fx.Node
    scale: float
    terms: list[MaskTerm]
    score_chain: list[fx.Node]        # product → softmax, exclusive
    prob_chain: list[fx.Node]         # softmax → value product, exclusive
    query_permutation: list[int] | None = None   # einsum layouts
    key_permutation: list[int] | None = None
    value_permutation: list[int] | None = None
    output_permutation: list[int] | None = None
    enable_gqa: bool = False
    unrepeated: bool = False
    constant_mask: str | None = None  # ZERO: the mask goes; CAUSAL: is_causal=True instead

    @property
    def pattern(self) -> str:
        scaled = "unscaled" if self.scale == 1.0 else "scaled"
        mask = "" if not self.terms else ("_mask" if len(self.terms) == 1 else "_bias")
        return f"fused_{scaled}{mask}{'_gqa' if self.unrepeated else ''}"


# ---------------------------------------------------------------------------------------------
# scalars


def _scalar(graph: Graph, argument: Any) -> float | None:
    """The value of a Python number or a constant one-element tensor node, else None."""
    if isinstance(argument, bool):
        return None
    if isinstance(argument, (int, float)):
        return float(argument)
    if not isinstance(argument, fx.Node):
        return None
    if argument.op == "get_attr":
        tensor = graph.attribute(argument)
        if tensor is not None and tensor.numel() == 1 and not tensor.dtype.is_complex \
                and tensor.dtype != torch.bool:
            return float(tensor.reshape(()).item())
        return None
    if argument.target in (aten.lift_fresh_copy.default, aten.clone.default, aten.detach.default) \
            or argument.target in _CASTS:
        return _scalar(graph, argument.args[0])
    if argument.target == aten.scalar_tensor.default:
        return _scalar(graph, argument.args[0])
    if argument.target == aten.full.default and all(int(s) == 1 for s in argument.args[0]):
        return _scalar(graph, argument.args[1])
    if argument.target == aten.sqrt.default:
        inner = _scalar(graph, argument.args[0])
        return math.sqrt(inner) if inner is not None and inner >= 0 else None
    return None


def _is_one_element(node: Any) -> bool:
    value = _val(node)
    return isinstance(value, torch.Tensor) and all(isinstance(s, int) and s == 1 for s in value.shape)


# ---------------------------------------------------------------------------------------------
# pattern: walk back from the softmax to the score product


def _leads_to_product(node: Any, depth: int = 12) -> bool:
    """Is a score product reachable backwards through ops the score chain may hold?"""
    while depth > 0 and isinstance(node, fx.Node) and node.op == "call_function":
        if node.target in _SCORE_PRODUCTS:
            return True
        if node.target in _CASTS | _IDENTITIES or node.target in (aten.masked_fill.Scalar,
                                                                   aten.masked_fill.Tensor):
            node = node.args[0]
        elif node.target in (aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor):
            return any(_leads_to_product(a, depth - 1) for a in node.args[:2])
        elif node.target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
            return any(_leads_to_product(a, depth - 1) for a in node.args[1:3])
        else:
            return False
        depth -= 1
    return False


def _row_max_nodes(node: Any, source: fx.Node) -> list[fx.Node]:
    """The nodes of ``amax(source, -1, keepdim=True)`` or ``max(source, -1, True)[0]`` (maybe
    detached) when ``node`` is that row maximum, else ``[]``."""
    nodes = []
    if _is_call(node, {aten.detach.default, aten.alias.default}):
        nodes.append(node)
        node = node.args[0]
    rank = _val(source).dim() if _val(source) is not None else 0
    if _is_call(node, {aten.amax.default}) and node.args[0] is source:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", [])
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if keep and len(dims) == 1 and rank and dims[0] % rank == rank - 1:
            return nodes + [node]
    if _is_call(node) and node.target is operator.getitem and node.args[1] == 0:
        reduction = node.args[0]
        if _is_call(reduction, {aten.max.dim}) and reduction.args[0] is source and rank:
            keep = reduction.args[2] if len(reduction.args) > 2 else reduction.kwargs.get("keepdim", False)
            unused = [u for u in reduction.users if u is not node]  # the argmax half
            if keep and reduction.args[1] % rank == rank - 1 and not any(u.users for u in unused):
                return nodes + [node, *unused, reduction]
    return []


def _is_row_max_of(node: Any, source: fx.Node) -> bool:
    return bool(_row_max_nodes(node, source))


def _side_nodes(chain: list[fx.Node]) -> list[fx.Node]:
    """Nodes off the chain that the match consumes: row maxima subtracted for stability."""
    return [side for node in chain if node.target == aten.sub.Tensor
            for side in _row_max_nodes(node.args[1], node.args[0])]


def _score_chain(graph: Graph, softmax: fx.Node
                 ) -> tuple[fx.Node, list[fx.Node], list[MaskTerm], float] | Reason:
    """Walk from the softmax input back to the Q·Kᵀ product; collect scale and mask terms."""
    chain: list[fx.Node] = []           # softmax-side first
    node = softmax.args[0]
    while True:
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return Reason("no Q·Kᵀ product before the softmax")
        if node.target in _SCORE_PRODUCTS:
            break
        reason = _only_feeds(node, chain[-1] if chain else softmax, softmax)
        if reason:
            return reason
        chain.append(node)
        target = node.target
        if target in _CASTS | _IDENTITIES:
            node = node.args[0]
        elif target in (aten.mul.Tensor, aten.div.Tensor):
            left, right = node.args[:2]
            if target == aten.mul.Tensor and _scalar(graph, left) is not None:
                left, right = right, left
            if _scalar(graph, right) is None:
                if _is_one_element(right):
                    return Reason("the scale is a tensor computed at run time")
                return Reason(f"the scores are {'multiplied' if target == aten.mul.Tensor else 'divided'} "
                              f"by a tensor, not a scalar scale")
            node = left
        elif target in (aten.add.Tensor, aten.sub.Tensor):
            left, right = node.args[:2]
            if target == aten.sub.Tensor and _is_row_max_of(right, left):
                node = left           # softmax(x - rowmax(x)) == softmax(x)
            elif _leads_to_product(left):
                node = left
            elif target == aten.add.Tensor and _leads_to_product(right):
                node = right
            else:
                return Reason("no Q·Kᵀ product before the softmax")
        elif target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            node = node.args[0]
        elif target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
            _cond, first, second = node.args[:3]
            node = first if _leads_to_product(first) else second
        elif target in _SOFTMAXES:
            return Reason("a second softmax between the product and this softmax")
        elif target in _VIEWS:
            return Reason(f"the scores are reshaped ({_op_name(node)}) between the product and the softmax")
        elif target == aten.tanh.default:
            return Reason("the scores are soft-capped (tanh), which SDPA cannot express")
        else:
            return Reason(f"{_op_name(node)} between the Q·Kᵀ product and the softmax")
    product = node
    reason = _only_feeds(product, chain[-1] if chain else softmax, softmax)
    if reason:
        return reason
    chain.reverse()                     # product-side first
    return _fold_chain(graph, product, chain)


def _only_feeds(node: fx.Node, next_node: fx.Node, softmax: fx.Node) -> Reason | None:
    """``node`` (scores on their way to the softmax) feeds only ``next_node``."""
    allowed = {next_node}
    if next_node.target == aten.sub.Tensor and next_node.args[0] is node:
        allowed.update(_row_max_nodes(next_node.args[1], node))
    others = [user for user in _users(node) if user not in allowed]
    if not others:
        return None
    order = {n: index for index, n in enumerate(node.graph.nodes)}
    if all(_depends_on(softmax, other, order) for other in others):
        return Reason("mask depends on data: it is computed from the attention scores")
    names = ", ".join(other.name for other in others)
    return Reason(f"the attention scores are also used outside the attention (by {names})")


def _fold_chain(graph: Graph, product: fx.Node, chain: list[fx.Node]
                ) -> tuple[fx.Node, list[fx.Node], list[MaskTerm], float] | Reason:
    """Turn the chain, product → softmax, into SDPA's ``scale`` and additive mask terms."""
    scale = 1.0
    terms: list[MaskTerm] = []
    previous: fx.Node = product
    for node in chain:
        target = node.target
        if target in (aten.mul.Tensor, aten.div.Tensor):
            other = node.args[1] if node.args[0] is previous else node.args[0]
            factor = _scalar(graph, other)
            if target == aten.div.Tensor:
                if factor == 0:
                    return Reason("the scores are divided by zero")
                factor = 1.0 / factor
            if terms and factor < 0:
                return Reason("a negative scale after the mask turns -inf into +inf")
            scale *= factor
            for term in terms:
                term.factor *= factor
        elif target in (aten.add.Tensor, aten.sub.Tensor):
            other = node.args[1] if node.args[0] is previous else node.args[0]
            if target == aten.sub.Tensor and _is_row_max_of(other, previous):
                pass
            elif isinstance(other, (int, float)):
                pass                    # softmax(x + c) == softmax(x): a constant shift
            elif isinstance(other, fx.Node):
                alpha = node.kwargs.get("alpha", 1)
                terms.append(MaskTerm(tensor=other, factor=float(alpha),
                                      negate=target == aten.sub.Tensor))
            else:
                return Reason(f"unrecognised mask operand {other!r}")
        elif target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            fill = _scalar(graph, node.args[2])
            reason = _check_fill(fill)
            if reason:
                return reason
            terms.append(MaskTerm(fill_where=node.args[1], fill=fill))
        elif target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
            condition, first, second = node.args[:3]
            keeps_where_true = first is previous
            fill = _scalar(graph, second if keeps_where_true else first)
            reason = _check_fill(fill)
            if reason:
                return reason
            terms.append(MaskTerm(fill_where=condition, fill_where_negated=keeps_where_true, fill=fill))
        previous = node
    return product, chain, terms, scale


def _check_fill(fill: float | None) -> Reason | None:
    if fill is None:
        return Reason("the masked_fill value is not a constant")
    if fill > ABSORBING_FILL:
        return Reason(f"the mask fills {fill:g}, not -inf or an absorbing minimum: rows with every "
                      f"key masked would differ")
    return None


# ---------------------------------------------------------------------------------------------
# pattern: from the softmax forward to the value product


def _prob_chain(softmax: fx.Node) -> tuple[fx.Node, list[fx.Node]] | Reason:
    chain: list[fx.Node] = []
    node = softmax
    while True:
        users = _users(node)
        if len(users) != 1:
            return Reason("the attention probabilities are also used outside the attention "
                          "(output_attentions?)" if users else "the attention probabilities are unused")
        user = users[0]
        if user.target in _VALUE_PRODUCTS:
            if user.target == aten.einsum.default:
                if list(user.args[1])[0] is not node:
                    return Reason("the probabilities are the right operand of the value product")
            elif user.args[0] is not node:
                return Reason("the probabilities are the right operand of the value product")
            return user, chain
        if user.target in _CASTS | _IDENTITIES:
            pass
        elif user.target in _DROPOUTS:
            probability = user.args[1] if len(user.args) > 1 else user.kwargs.get("p", 0.5)
            train = user.args[2] if len(user.args) > 2 else user.kwargs.get("train", True)
            if train and probability > 0:
                return Reason("dropout on the probabilities is active (training mode)")
        else:
            return Reason(f"{_op_name(user)} between the softmax and the value product")
        chain.append(user)
        node = user


# ---------------------------------------------------------------------------------------------
# pattern: the operands of the products


def _einsum_terms(node: fx.Node) -> tuple[str, str, str] | Reason:
    equation = str(node.args[0]).replace(" ", "")
    operands = list(node.args[1])
    if "->" not in equation or "." in equation or len(operands) != 2:
        return Reason(f"einsum {equation!r} is not a two-operand product with explicit output")
    inputs, output = equation.split("->")
    first, second = inputs.split(",")
    if any(len(set(term)) != len(term) for term in (first, second, output)):
        return Reason(f"einsum {equation!r} repeats an index")
    return first, second, output


def _layout(term: str, wanted: str) -> list[int] | None:
    """The permutation taking ``term``'s dimension order to ``wanted`` (None: already there)."""
    order = [term.index(letter) for letter in wanted]
    return None if order == list(range(len(term))) else order


def _score_operands(graph: Graph, product: fx.Node, match: dict) -> list[MaskTerm] | Reason:
    """Fill query/key (and einsum layouts) for the product; baddbmm adds a term and a scale."""
    extra: list[MaskTerm] = []
    if product.target == aten.einsum.default:
        terms = _einsum_terms(product)
        if isinstance(terms, Reason):
            return terms
        first, second, output = terms
        contracted = [c for c in first if c in second and c not in output]
        batch = [c for c in output if c in first and c in second]
        query_only = [c for c in first if c in output and c not in second]
        key_only = [c for c in second if c in output and c not in first]
        if len(contracted) != 1 or len(query_only) != 1 or len(key_only) != 1 or \
                len(batch) + 2 != len(output) or len(first) != len(output) or len(second) != len(output):
            return Reason(f"einsum '{first},{second}->{output}' is not a batched Q·Kᵀ")
        if output != "".join(batch) + query_only[0] + key_only[0]:
            return Reason(f"einsum '{first},{second}->{output}' does not put (query, key) last")
        batch_text = "".join(batch)
        match["query"], match["key"] = product.args[1]
        match["query_permutation"] = _layout(first, batch_text + query_only[0] + contracted[0])
        match["key_permutation"] = _layout(second, batch_text + key_only[0] + contracted[0])
        match["key_is_transposed"] = False
        return extra
    if product.target == aten.baddbmm.default:
        bias, query, key_t = product.args[:3]
        beta = product.kwargs.get("beta", 1)
        alpha = product.kwargs.get("alpha", 1)
        match["scale_factor"] = float(alpha)
        if beta != 0:
            extra.append(MaskTerm(tensor=bias, factor=float(beta)))
    else:
        query, key_t = product.args[:2]
    match["query"] = query
    source = _untranspose(key_t)
    match["key"], match["key_is_transposed"] = (source, False) if source is not None else (key_t, True)
    return extra


def _untranspose(node: Any) -> fx.Node | None:
    """``K`` when ``node`` is ``K`` with its last two dimensions swapped."""
    value = _val(node)
    if not _is_call(node) or value is None:
        return None
    rank = value.dim()
    if node.target == aten.transpose.int:
        dims = sorted(int(d) % rank for d in node.args[1:3])
        return node.args[0] if dims == [rank - 2, rank - 1] else None
    if node.target == aten.permute.default:
        order = [int(d) % rank for d in node.args[1]]
        return node.args[0] if order == list(range(rank - 2)) + [rank - 1, rank - 2] else None
    if node.target in (aten.t.default, aten.numpy_T.default) and rank == 2:
        return node.args[0]
    return None


def _value_operand(product: fx.Node, match: dict) -> Reason | None:
    if product.target != aten.einsum.default:
        match["value"] = product.args[1]
        return None
    terms = _einsum_terms(product)
    if isinstance(terms, Reason):
        return terms
    probs, value, output = terms
    contracted = [c for c in probs if c in value and c not in output]
    batch = [c for c in probs if c in value and c in output]
    query_only = [c for c in probs if c in output and c not in value]
    value_only = [c for c in value if c in output and c not in probs]
    if len(contracted) != 1 or len(query_only) != 1 or len(value_only) != 1 or \
            len(batch) + 2 != len(probs) or len(value) != len(probs) or len(output) != len(probs):
        return Reason(f"einsum '{probs},{value}->{output}' is not a batched P·V")
    if probs[-2:] != query_only[0] + contracted[0]:
        return Reason(f"einsum '{probs},{value}->{output}' does not read the probabilities as (query, key)")
    batch_text = probs[:-2]
    match["value"] = product.args[1][1]
    match["value_permutation"] = _layout(value, batch_text + contracted[0] + value_only[0])
    match["output_permutation"] = _layout(batch_text + query_only[0] + value_only[0], output)
    return None


def _unrepeat(node: Any) -> tuple[fx.Node, int] | None:
    """``(kv_BHkvSE, R)`` when ``node`` is transformers' ``repeat_kv(kv, R)``:
    ``kv[:, :, None].expand(B, Hkv, R, S, E).reshape(B, Hkv·R, S, E)``."""
    if not _is_call(node, {aten.reshape.default, aten.view.default, aten._unsafe_view.default}):
        return None
    expanded = node.args[0]
    while _is_call(expanded, _IDENTITIES):
        expanded = expanded.args[0]
    if not _is_call(expanded, {aten.expand.default}):
        return None
    inserted = expanded.args[0]
    if not _is_call(inserted, {aten.unsqueeze.default}) or int(inserted.args[1]) % 5 != 2:
        return None
    source = inserted.args[0]
    while _is_call(source, {aten.slice.Tensor}) and _full_slice(source):
        source = source.args[0]
    small, big, out = _val(source), _val(expanded), _val(node)
    if small is None or big is None or out is None or small.dim() != 4 or big.dim() != 5:
        return None
    batch, heads, length, width = small.shape
    repeat = big.shape[2]
    if not _same_shape(big.shape, (batch, heads, repeat, length, width)) or \
            not _same_shape(out.shape, (batch, heads * repeat, length, width)):
        return None
    if not isinstance(repeat, int):
        return None
    return source, repeat


def _full_slice(node: fx.Node) -> bool:
    value, source = _val(node), _val(node.args[0])
    return value is not None and source is not None and _same_shape(value.shape, source.shape)


def _same_size(first: Any, second: Any) -> bool:
    if isinstance(first, int) and isinstance(second, int):
        return first == second
    expr = lambda size: size.node.expr if isinstance(size, torch.SymInt) else size  # noqa: E731
    return expr(first) == expr(second)


def _same_shape(first: Any, second: Any) -> bool:
    return len(first) == len(second) and all(_same_size(a, b) for a, b in zip(first, second))


# ---------------------------------------------------------------------------------------------
# the rule: pattern + check


def match_attention(graph: Graph, softmax: fx.Node, config: Config) -> AttentionMatch | Reason:
    """Match the attention around ``softmax``, or say why it is not one SDPA can replace."""
    value = _val(softmax)
    if value is None:
        return Reason("the softmax has no recorded shape")
    dim = int(softmax.args[1]) if len(softmax.args) > 1 else int(softmax.kwargs.get("dim", -1))
    if dim % value.dim() != value.dim() - 1:
        return Reason(f"softmax not over the last dim (dim={dim} of {value.dim()})")
    found = _score_chain(graph, softmax)
    if isinstance(found, Reason):
        return found
    product, score_chain, terms, scale = found
    prob = _prob_chain(softmax)
    if isinstance(prob, Reason):
        return prob
    value_product, prob_chain = prob
    operands: dict = {}
    extra = _score_operands(graph, product, operands)
    if isinstance(extra, Reason):
        return extra
    reason = _value_operand(value_product, operands)
    if reason:
        return reason
    factor = operands.get("scale_factor", 1.0)   # baddbmm's alpha scales the product only
    terms = extra + terms
    match = AttentionMatch(
        softmax=softmax, score_product=product, value_product=value_product,
        query=operands["query"], key=operands["key"], key_is_transposed=operands["key_is_transposed"],
        value=operands["value"], scale=scale * factor, terms=terms, score_chain=score_chain,
        prob_chain=prob_chain, query_permutation=operands.get("query_permutation"),
        key_permutation=operands.get("key_permutation"),
        value_permutation=operands.get("value_permutation"),
        output_permutation=operands.get("output_permutation"))
    for term in extra:                  # baddbmm's bias is added after alpha·product, then scaled
        term.factor *= scale
    reason = _check(graph, match, config)
    return reason if reason else match


def _check(graph: Graph, match: AttentionMatch, config: Config) -> Reason | None:
    product, softmax = match.score_product, match.softmax
    scores = _val(product)
    if scores is None or scores.dim() < 2:
        return Reason("the Q·Kᵀ product has no recorded shape")
    if scores.dim() > 4:
        return Reason(f"attention over {scores.dim() - 2} batch dimensions (SDPA's export needs at most 2)")
    if not scores.dtype.is_floating_point:
        return Reason(f"the scores are {scores.dtype}")
    for node in match.score_chain + [softmax]:
        if not _same_shape(_val(node).shape, scores.shape):
            return Reason("the mask broadcasts the scores to a larger shape")
    # masks must be computable before the product: nothing in them may read the scores
    order = {node: index for index, node in enumerate(graph.fx.nodes)}
    for term in match.terms:
        for operand in (term.tensor, term.fill_where):
            if operand is not None and _depends_on(operand, product, order):
                return Reason("mask depends on data: it is computed from the attention scores")
    for term in match.terms:
        if term.tensor is not None:
            mask = _val(term.tensor)
            if mask is None or not mask.dtype.is_floating_point:
                return Reason("an additive mask that is not a float tensor")
            if mask.dtype != scores.dtype:
                return Reason(f"the additive mask is {mask.dtype}, the scores {scores.dtype}")
        elif _val(term.fill_where) is None or _val(term.fill_where).dtype != torch.bool:
            return Reason("a fill mask that is not boolean")
    # dtypes: the probabilities reach the value product in the scores' dtype; nothing narrower
    for node in match.score_chain + [softmax] + match.prob_chain:
        dtype = _val(node).dtype
        if not dtype.is_floating_point or dtype.itemsize < scores.dtype.itemsize:
            return Reason(f"the scores are narrowed to {dtype} before the value product")
    for name, node in (("value", match.value), ("output", match.value_product)):
        if _val(node) is None or _val(node).dtype != scores.dtype:
            return Reason(f"the {name} is not {scores.dtype} like the scores")
    return _check_heads(match, config)


def _check_heads(match: AttentionMatch, config: Config) -> Reason | None:
    """Query, key and value agree on the batch dimensions, or differ as grouped-query heads."""
    if match.query_permutation is None and match.key_permutation is None and config.unrepeat_kv:
        key_source = None if match.key_is_transposed else _unrepeat(match.key)
        value_source = None if match.value_permutation else _unrepeat(match.value)
        if key_source and value_source and key_source[1] == value_source[1]:
            match.key, match.value = key_source[0], value_source[0]
            match.enable_gqa = match.unrepeated = True
    query, key, value = (_permuted_shape(n, p) for n, p in (
        (match.query, match.query_permutation), (match.key, match.key_permutation),
        (match.value, match.value_permutation)))
    if match.key_is_transposed:
        key = key[:-2] + (key[-1], key[-2])
    if not (len(query) == len(key) == len(value)):
        return Reason("query, key and value differ in rank (broadcast product)")
    if not _same_shape(key[:-1], value[:-1]):
        return Reason("key and value disagree on the batch and key-length dimensions")
    if _same_shape(query[:-2], key[:-2]):
        return None
    if len(query) == 4 and _same_size(query[0], key[0]) and isinstance(query[1], int) and \
            isinstance(key[1], int) and key[1] < query[1] and query[1] % key[1] == 0:
        match.enable_gqa = True          # MQA / GQA through matmul broadcasting, or un-repeated
        return None
    return Reason("key/value batch dimensions broadcast against the queries in a way SDPA does not")


def _permuted_shape(node: fx.Node, permutation: list[int] | None) -> tuple:
    shape = tuple(_val(node).shape)
    return shape if permutation is None else tuple(shape[i] for i in permutation)


def _depends_on(node: fx.Node, target: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Does ``node`` read ``target``, directly or not? Only nodes after ``target`` can."""
    limit = order[target]
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current is target:
            return True
        if current in seen or order.get(current, -1) <= limit:
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return False


# ---------------------------------------------------------------------------------------------
# the rule: replacement


class _Builder:
    """Inserts stamped nodes before a site, with FakeTensor metadata computed as it goes."""

    def __init__(self, graph: Graph, before: fx.Node, source: fx.Node):
        self.graph, self.before, self.source = graph, before, source
        self.fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.fx.nodes
                                           if isinstance(n.meta.get("val"), torch.Tensor)])

    def __call__(self, target: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        with self.graph.fx.inserting_before(self.before):
            node = self.graph.fx.call_function(target, args, kwargs)
        node.meta["val"] = self._fake(target, args, kwargs)
        return stamp(node, NAME, self.source)

    def size(self, node: fx.Node, dim: int) -> Any:
        """The size of ``node``'s dimension ``dim``: an int, or a ``sym_size`` node when symbolic."""
        size = _val(node).shape[dim]
        if isinstance(size, int):
            return size
        return self(aten.sym_size.int, node, dim % _val(node).dim())

    def _fake(self, target: Callable, args: tuple, kwargs: dict) -> Any:
        if self.fake_mode is None:
            return None

        def value(argument: Any) -> Any:
            if isinstance(argument, fx.Node):
                found = argument.meta.get("val")
                if found is None and argument.op == "get_attr":
                    found = self.graph.attribute(argument)
                if isinstance(found, torch.Tensor) and not isinstance(found, torch._subclasses.FakeTensor):
                    found = self.fake_mode.from_tensor(found)
                return found
            if isinstance(argument, (list, tuple)):
                return type(argument)(value(a) for a in argument)
            if isinstance(argument, dict):
                return {key: value(item) for key, item in argument.items()}
            return argument

        try:
            with self.fake_mode:
                return target(*value(args), **value(kwargs))
        except Exception:  # metadata is best effort; the graph itself stays correct
            return None


def _replace(graph: Graph, match: AttentionMatch, config: Config) -> fx.Node:
    site = match.value_product
    emit = _Builder(graph, site, match.softmax)
    query, key, value = match.query, match.key, match.value
    if match.query_permutation:
        query = emit(aten.permute.default, query, match.query_permutation)
    if match.key_permutation:
        key = emit(aten.permute.default, key, match.key_permutation)
    if match.key_is_transposed:
        key = emit(aten.transpose.int, key, -2, -1)
    if match.value_permutation:
        value = emit(aten.permute.default, value, match.value_permutation)
    mask = None if match.constant_mask else _build_mask(emit, match.terms, _val(match.score_product).dtype)
    rank = _val(query).dim()
    for _ in range(4 - rank):            # ONNX Attention takes 4-D operands only (bmm forms are
        query, key, value = (emit(aten.unsqueeze.default, t, 0) for t in (query, key, value))
        # 3-D); the mask needs no unsqueeze: it still broadcasts from the right
    if mask is not None and config.expand_mask:
        mask = _expand_mask(emit, mask, query, key)
    if mask is not None:
        mask = _detached(emit, mask)
    kwargs: dict[str, Any] = {"attn_mask": mask, "scale": match.scale}
    if match.constant_mask == CAUSAL:
        kwargs["is_causal"] = True
    if match.enable_gqa:
        kwargs["enable_gqa"] = True
    fused = emit(_SDPA, query, key, value, **kwargs)
    output = fused
    for _ in range(4 - rank):
        output = emit(aten.squeeze.dim, output, 0)
    if match.output_permutation:
        output = emit(aten.permute.default, output, match.output_permutation)
    site.replace_all_uses_with(output)
    order = {node: index for index, node in enumerate(graph.fx.nodes)}
    spanned = [site, *match.prob_chain, match.softmax, *match.score_chain, match.score_product,
               *_side_nodes(match.score_chain)]
    for node in sorted(spanned, key=order.__getitem__, reverse=True):
        for user in list(node.users):
            if user.target in _ASSERTS:
                graph.fx.erase_node(user)
        graph.fx.erase_node(node)
    return fused


def _build_mask(emit: _Builder, terms: list[MaskTerm], dtype: torch.dtype) -> fx.Node | None:
    """Σ terms as one additive mask of the scores' dtype, in the order the model added them."""
    mask = None
    for term in terms:
        factor = -term.factor if term.negate else term.factor
        if term.tensor is not None:
            part = term.tensor
        else:
            # masked_fill(x, m, fill): fill where m;  where(keep, x, fill): fill where not keep
            where_fill = (0.0, term.fill) if term.fill_where_negated else (term.fill, 0.0)
            part = emit(aten.where.Scalar, term.fill_where, *where_fill)
            if _val(part) is not None and _val(part).dtype != dtype:
                part = emit(aten._to_copy.default, part, dtype=dtype)
        if factor != 1.0:
            part = emit(aten.mul.Tensor, part, factor)
        mask = part if mask is None else emit(aten.add.Tensor, mask, part)
    return mask


def _detached(emit: _Builder, mask: fx.Node) -> fx.Node:
    """The mask, detached when it derives from weights (T5's relative position bias).

    With a mask that requires grad, torch.export's trace runs SDPA's math kernel while the ONNX
    exporter's decomposition runs the CPU flash kernel: their outputs have different strides, and
    the model's ``.transpose(1, 2).contiguous().view(...)`` after it fails to re-trace. Detaching
    (a no-op at inference) makes both pick the same kernel.
    """
    if not _reads_trainable_weight(emit.graph, mask):
        return mask
    return emit(aten.detach.default, mask)


def _reads_trainable_weight(graph: Graph, node: fx.Node) -> bool:
    # the recorded FakeTensors say requires_grad=False throughout; the weights themselves know
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr":
            tensor = graph.attribute(current)
            if tensor is not None and tensor.requires_grad:
                return True
        elif current.target != aten.detach.default and isinstance(_val(current), torch.Tensor):
            stack.extend(current.all_input_nodes)  # sizes (sym_size) carry no gradient
    return False


def _expand_mask(emit: _Builder, mask: fx.Node, query: fx.Node, key: fx.Node) -> fx.Node:
    """Give the mask's last two dimensions their full lengths L and S (an expand: a view)."""
    while _val(mask).dim() < 2:
        mask = emit(aten.unsqueeze.default, mask, 0)
    shape = _val(mask).shape
    sizes: list[Any] = [-1] * len(shape)
    if _same_size(shape[-2], 1) and not _same_size(_val(query).shape[-2], 1):
        sizes[-2] = emit.size(query, -2)
    if _same_size(shape[-1], 1) and not _same_size(_val(key).shape[-2], 1):
        sizes[-1] = emit.size(key, -2)
    if sizes[-2] == -1 and sizes[-1] == -1:
        return mask
    return emit(aten.expand.default, mask, sizes)


# ---------------------------------------------------------------------------------------------
# constant masks: causal -> is_causal=True, all zero -> no mask


class _ConstantMasks:
    """Verdicts of :func:`classify_mask`, one per distinct mask (a model's layers share one)."""

    def __init__(self, graph: Graph, config: Config):
        self.graph, self.config = graph, config
        self.verdicts: dict[tuple, ConstantMask | Reason] = {}

    def site(self, match: AttentionMatch) -> ConstantMask | Reason | None:
        """For a matched site: None without a mask, else what its mask is or why it stays."""
        if not match.terms:
            return None
        if not self.config.constant_masks:
            return Reason("disabled (Config.constant_masks)")
        scores = _val(match.score_product)
        nodes = [term.tensor if term.tensor is not None else term.fill_where for term in match.terms]
        key = (tuple((id(n), t.fill, t.factor, t.negate, t.fill_where_negated)
                     for n, t in zip(nodes, match.terms)), _shape_key(scores.shape), scores.dtype)
        if key not in self.verdicts:
            self.verdicts[key] = _classify(self.graph, nodes, _additive(match.terms, scores.dtype),
                                           tuple(scores.shape), self.config.mask_check_sizes)
        return self.verdicts[key]

    def sdpa(self, node: fx.Node) -> ConstantMask | Reason | None:
        """For an SDPA call already in the graph (boolean or additive ``attn_mask``)."""
        mask = _sdpa_argument(node, 3, "attn_mask")
        if not isinstance(mask, fx.Node):
            return None
        if not self.config.constant_masks:
            return Reason("disabled (Config.constant_masks)")
        if _sdpa_argument(node, 4, "dropout_p", 0.0) != 0 or _sdpa_argument(node, 5, "is_causal", False):
            return Reason("the call has dropout or is_causal already")
        query, key = _val(node.args[0]), _val(node.args[1])
        if query is None or key is None or _val(mask) is None:
            return Reason("computed by an op without recorded shapes")
        scores_shape = (*query.shape[:-1], key.shape[-2])
        cache_key = (id(mask), _shape_key(scores_shape), "sdpa")
        if cache_key not in self.verdicts:
            self.verdicts[cache_key] = _classify(self.graph, [mask], lambda values: values[0],
                                                 scores_shape, self.config.mask_check_sizes)
        return self.verdicts[cache_key]


def _classify(graph: Graph, *args: Any) -> ConstantMask | Reason:
    """:func:`classify_mask`; should it fail, the mask stays and the site still fuses."""
    try:
        return classify_mask(graph, *args)
    except Exception as error:  # noqa: BLE001 - a check that breaks keeps the mask, not the pass
        return Reason(f"check failed ({type(error).__name__})")


def _shape_key(shape: Any) -> tuple:
    return tuple(str(size) for size in shape)   # SymInts do not hash; their expressions print


def _additive(terms: list[MaskTerm], dtype: torch.dtype) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """Σ terms evaluated in torch, as :func:`_build_mask` writes them into the graph."""
    def combine(values: list[torch.Tensor]) -> torch.Tensor:
        mask = None
        for term, value in zip(terms, values):
            factor = -term.factor if term.negate else term.factor
            if term.tensor is not None:
                part = value
            else:
                where_fill = (0.0, term.fill) if term.fill_where_negated else (term.fill, 0.0)
                part = torch.where(value, *where_fill).to(dtype)
            if factor != 1.0:
                part = part * factor
            mask = part if mask is None else mask + part
        return mask
    return combine


def _sdpa_argument(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _drop_sdpa_mask(node: fx.Node, kind: str) -> None:
    """Drop an SDPA call's constant mask; a causal one becomes ``is_causal=True``."""
    if len(node.args) > 3:
        node.update_arg(3, None)
    else:
        node.update_kwarg("attn_mask", None)
    if kind != CAUSAL:
        return
    if len(node.args) > 5:
        node.update_arg(5, True)
    else:
        node.update_kwarg("is_causal", True)


def _count_mask(stats: dict[str, float], verdict: ConstantMask | Reason | None) -> str | None:
    """Count a verdict in ``stats``; the kind of constant mask that goes, or None when it stays."""
    if isinstance(verdict, ConstantMask):
        stats["causal_from_mask" if verdict.kind == CAUSAL else "zero_mask_dropped"] += 1
        if not verdict.exhaustive:
            stats["mask_sampled_sizes"] = stats.get("mask_sampled_sizes", 0) + 1
        return verdict.kind
    if isinstance(verdict, Reason):
        key = f"mask kept: {verdict}"
        stats[key] = stats.get(key, 0) + 1
    return None


# ---------------------------------------------------------------------------------------------
# SDPA already in the graph


def _normalize_sdpa(graph: Graph, node: fx.Node, config: Config) -> bool:
    """Give an existing SDPA call the 4-D, full-mask form; True when it changed."""
    if not config.normalize_sdpa:
        return False
    query, key, value = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if _val(query) is None or _val(query).dim() != 4:
        return False                     # other ranks: left as the model wrote them
    if not isinstance(mask, fx.Node) or not config.expand_mask or _val(mask) is None:
        return False
    emit = _Builder(graph, node, node)
    expanded = _detached(emit, _expand_mask(emit, mask, query, key))
    if expanded is mask:
        return False
    if len(node.args) > 3:
        node.update_arg(3, expanded)
    else:
        node.update_kwarg("attn_mask", expanded)
    return True


# ---------------------------------------------------------------------------------------------
# near-misses: softmaxes that look like attention


def _looks_like_attention(softmax: fx.Node) -> bool:
    """A product reaches the softmax backwards, and the softmax reaches one forwards, through
    pointwise and view ops: the shape of attention, whatever stopped the match."""
    def reaches(start: fx.Node, forward: bool) -> bool:
        frontier, seen = [start], set()
        for _ in range(10):
            following = []
            for node in frontier:
                neighbours = _users(node) if forward else node.all_input_nodes
                for other in neighbours:
                    if other in seen or other.op != "call_function":
                        continue
                    seen.add(other)
                    if other.target in (_VALUE_PRODUCTS if forward else _SCORE_PRODUCTS):
                        return True
                    if _passes_through(other):
                        following.append(other)
            frontier = following
        return False

    return reaches(softmax, forward=False) and reaches(softmax, forward=True)


def _passes_through(node: fx.Node) -> bool:
    target = node.target
    if target in _CASTS | _IDENTITIES | _DROPOUTS | _VIEWS | _SOFTMAXES:
        return True
    if target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self,
                  aten.where.ScalarOther, aten.where.ScalarSelf):
        return True
    tags = getattr(target, "tags", ())
    return torch.Tag.pointwise in tags


# ---------------------------------------------------------------------------------------------
# the entry point


def _flops(graph: Graph, nodes: list[fx.Node]) -> str:
    try:
        from slimline.ir.cost import node_cost
    except ImportError:
        return "0"
    import sympy
    return str(sympy.expand(sum((node_cost(n, graph.rename).flops for n in nodes), sympy.Integer(0))))


def run(graph: Graph, config: Config, context: PassContext) -> PassResult:
    stats: dict[str, float] = {"already_sdpa": 0, "normalized_sdpa": 0, "near_miss": 0,
                               "causal_from_mask": 0, "zero_mask_dropped": 0}
    decisions: list[LayerDecision] = []
    constant_masks = _ConstantMasks(graph, config)
    for node in list(graph.fx.nodes):
        if node.op != "call_function":
            continue
        if node.target == _SDPA or node.target in _OTHER_SDPA:
            stats["already_sdpa"] += 1
            kind = _count_mask(stats, constant_masks.sdpa(node)) if node.target == _SDPA else None
            if kind:
                _drop_sdpa_mask(node, kind)
            elif node.target == _SDPA and _normalize_sdpa(graph, node, config):
                stats["normalized_sdpa"] += 1
            flops = _flops(graph, [node])
            decisions.append(LayerDecision(module_path(node), ATTENTION, ALREADY, NAME,
                                           flops_before=flops, flops_after=flops))
        elif node.target in _SOFTMAXES:
            found = match_attention(graph, node, config)
            if isinstance(found, Reason):
                if _looks_like_attention(node):
                    stats["near_miss"] += 1
                    decisions.append(LayerDecision(module_path(node), ATTENTION, KEPT, NAME,
                                                   why_not=str(found)))
                continue
            found.constant_mask = _count_mask(stats, constant_masks.site(found))
            before = _flops(graph, [found.score_product, *found.score_chain, found.softmax,
                                    *found.prob_chain, found.value_product])
            fused = _replace(graph, found, config)
            stats[found.pattern] = stats.get(found.pattern, 0) + 1
            decisions.append(LayerDecision(module_path(fused), ATTENTION, FUSED, NAME,
                                           flops_before=before, flops_after=_flops(graph, [fused])))
    changed = any(v for k, v in stats.items() if k.startswith("fused_")) or \
        stats["normalized_sdpa"] > 0 or stats["causal_from_mask"] > 0 or stats["zero_mask_dropped"] > 0
    if changed:
        graph.fx.eliminate_dead_code()
        graph.recompile()
    return PassResult(graph, changed, stats, decisions)
