"""Cost model on captured tiny models: symbolic FLOPs/bytes against hand formulas.

FLOP convention under test: a multiply-add is 2 FLOPs and a bias add is 1 FLOP per output
element, so ``linear(x_BSI, w_OI, b_O)`` costs ``2·B·S·I·O + B·S·O``.  ``torch.utils.flop_counter``
counts the same products without the bias adds, which gives an independent check.
"""

from __future__ import annotations

import time

import pytest
import sympy
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim, export
from torch.utils.flop_counter import FlopCounterMode

from slimline.errors import InputError
from slimline.ir.cost import Cost, evaluate, graph_cost, node_cost
from slimline.ir.shapes import (
    dim_symbol,
    dtype_bytes,
    rename_map_from_placeholders,
    symbol_values,
    sympy_shape,
    tensor_bytes,
)

batch, seq = dim_symbol("batch"), dim_symbol("seq")


def capture(model, args, dynamic_dims=None, min_size=2):
    """Export ``model`` with the given {(input, dim): name} dynamic, return (gm, rename)."""
    torch.manual_seed(0)
    dims = {}
    dynamic_shapes = None
    if dynamic_dims:
        dynamic_shapes = [None] * len(args)
        for (index, dim), name in dynamic_dims.items():
            dims.setdefault(name, Dim(name, min=min_size))
            dynamic_shapes[index] = {**(dynamic_shapes[index] or {}), dim: dims[name]}
        dynamic_shapes = tuple(dynamic_shapes)
    program = export(model.eval(), tuple(args), dynamic_shapes=dynamic_shapes, strict=False)
    gm = program.module()
    return gm, rename_map_from_placeholders(gm, dynamic_dims or {})


def nodes_by_target(gm, target):
    return [node for node in gm.graph.nodes if node.target == target]


def counted_flops(model, args):
    with FlopCounterMode(display=False) as counter:
        model(*args)
    return counter.get_total_flops()


def expand_equal(left, right):
    return sympy.expand(left - right) == 0


class LinearStack(nn.Module):
    def __init__(self, width_in=8, hidden=16, width_out=4):
        super().__init__()
        self.up = nn.Linear(width_in, hidden)
        self.down = nn.Linear(hidden, width_out, bias=False)

    def forward(self, x_BSI):
        return self.down(torch.relu(self.up(x_BSI)))


def test_linear_stack_flops_symbolic_and_concrete():
    model = LinearStack()
    x_BSI = torch.randn(3, 5, 8)
    gm, rename = capture(model, [x_BSI], {(0, 0): "batch", (0, 1): "seq"})
    total, per_node, uncounted = graph_cost(gm, rename)

    up, down = nodes_by_target(gm, torch.ops.aten.linear.default)
    assert expand_equal(per_node[up.name].flops, 2 * batch * seq * 8 * 16 + batch * seq * 16)
    assert expand_equal(per_node[down.name].flops, 2 * batch * seq * 16 * 4)
    relu_flops = batch * seq * 16
    expected = 2 * batch * seq * 8 * 16 + batch * seq * 16 + relu_flops + 2 * batch * seq * 16 * 4
    assert expand_equal(total.flops, expected)
    assert uncounted == ()

    for sizes in [(3, 5), (7, 11)]:
        x = torch.randn(*sizes, 8)
        values = symbol_values(gm, [x], rename)
        assert values == {batch: sizes[0], seq: sizes[1]}
        products = evaluate(total.flops, values) - evaluate(relu_flops + batch * seq * 16, values)
        assert products == counted_flops(model, [x])


def test_linear_bytes_formula():
    gm, rename = capture(nn.Linear(8, 16), [torch.randn(2, 3, 8)], {(0, 0): "batch", (0, 1): "seq"})
    (linear,) = nodes_by_target(gm, torch.ops.aten.linear.default)
    # float32: read x_BSI, w_OI, b_O once, write y_BSO
    expected = 4 * (batch * seq * 8 + 16 * 8 + 16 + batch * seq * 16)
    assert expand_equal(node_cost(linear, rename).bytes, expected)
    assert evaluate(node_cost(linear, rename).bytes, {"batch": 2, "seq": 3}) == 4 * (48 + 128 + 16 + 96)


class HandAttention(nn.Module):
    """Multi-head self-attention written with matmul and softmax."""

    def __init__(self, width=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x_BSD):
        B, S, D = x_BSD.shape
        q_BSD, k_BSD, v_BSD = self.qkv(x_BSD).split(D, dim=-1)
        q_BHSd, k_BHSd, v_BHSd = (
            t.view(B, S, self.heads, D // self.heads).transpose(1, 2) for t in (q_BSD, k_BSD, v_BSD)
        )
        scores_BHSS = q_BHSd @ k_BHSd.transpose(-1, -2) / (D // self.heads) ** 0.5
        y_BHSd = torch.softmax(scores_BHSS, dim=-1) @ v_BHSd
        return self.out(y_BHSd.transpose(1, 2).reshape(B, S, D))


def test_hand_attention_matmul_and_softmax_formulas():
    model = HandAttention()
    x_BSD = torch.randn(2, 6, 16)
    gm, rename = capture(model, [x_BSD], {(0, 0): "batch", (0, 1): "seq"})
    total, per_node, uncounted = graph_cost(gm, rename)
    assert uncounted == ()

    scores, mix = nodes_by_target(gm, torch.ops.aten.matmul.default)
    heads, head_width = 2, 8
    assert expand_equal(per_node[scores.name].flops, 2 * batch * heads * seq * seq * head_width)
    assert expand_equal(per_node[mix.name].flops, 2 * batch * heads * seq * seq * head_width)
    (softmax,) = nodes_by_target(gm, torch.ops.aten.softmax.int)
    assert expand_equal(per_node[softmax.name].flops, 5 * batch * heads * seq * seq)
    # the transpose before reshape makes reshape a real copy: read + write B·S·D floats
    (reshape,) = nodes_by_target(gm, torch.ops.aten.reshape.default)
    assert expand_equal(per_node[reshape.name].bytes, 2 * 4 * batch * seq * 16)
    for view in nodes_by_target(gm, torch.ops.aten.view.default):
        assert per_node[view.name] == Cost()

    # the matrix products agree with torch's own counter at concrete sizes
    products = sum(
        (per_node[node.name].flops for node in gm.graph.nodes
         if node.target in (torch.ops.aten.matmul.default, torch.ops.aten.linear.default)),
        sympy.Integer(0),
    )
    bias_adds = batch * seq * 48 + batch * seq * 16
    for sizes in [(2, 6), (3, 9)]:
        x = torch.randn(*sizes, 16)
        values = symbol_values(gm, [x], rename)
        assert evaluate(products - bias_adds, values) == counted_flops(model, [x])


class FusedAttention(nn.Module):
    def __init__(self, is_causal):
        super().__init__()
        self.is_causal = is_causal

    def forward(self, q_BHLE, k_BHkvSE, v_BHkvSE):
        return F.scaled_dot_product_attention(
            q_BHLE, k_BHkvSE, v_BHkvSE, is_causal=self.is_causal, enable_gqa=True
        )


@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_gqa_counts_query_heads_and_causal_pairs(is_causal):
    q = torch.randn(2, 4, 5, 8)
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    dims = {(0, 0): "batch", (0, 2): "seq", (1, 0): "batch", (1, 2): "seq", (2, 0): "batch",
            (2, 2): "seq"}
    gm, rename = capture(FusedAttention(is_causal), [q, k, v], dims)
    (attention,) = nodes_by_target(gm, torch.ops.aten.scaled_dot_product_attention.default)
    pairs = seq * (seq + 1) / 2 if is_causal else seq * seq
    # Q·Kᵀ and ·V over the 4 query heads, 8 wide each
    assert expand_equal(node_cost(attention, rename).flops, 2 * batch * 4 * pairs * (8 + 8))
    if not is_causal:
        # torch's counter sees the same products written out with the key/value heads repeated
        def explicit(q, k, v):
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
            return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v

        values = symbol_values(gm, [q, k, v], rename)
        assert evaluate(node_cost(attention, rename).flops, values) == counted_flops(explicit, [q, k, v])


class GroupedConv(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, kernel_size=3, stride=stride, padding=1, groups=2)

    def forward(self, x_BCL):
        return self.conv(x_BCL)


def test_conv1d_groups_symbolic():
    gm, rename = capture(GroupedConv(1), [torch.randn(2, 4, 10)], {(0, 0): "batch", (0, 2): "seq"})
    (conv,) = nodes_by_target(gm, torch.ops.aten.conv1d.default)
    # out_(B, 6, L): 2 · numel(out) · (C_in/G = 2) · (kernel 3) + bias per output element
    assert expand_equal(node_cost(conv, rename).flops, 2 * batch * 6 * seq * 2 * 3 + batch * 6 * seq)
    weight_and_bias = 4 * (6 * 2 * 3 + 6)
    assert expand_equal(node_cost(conv, rename).bytes,
                        4 * batch * 4 * seq + weight_and_bias + 4 * batch * 6 * seq)


def test_strided_conv1d_matches_counter_at_concrete_lengths():
    model = GroupedConv(2)
    dims = {(0, 0): "batch", (0, 2): "seq"}
    gm, rename = capture(model, [torch.randn(3, 4, 10)], dims, min_size=3)
    total, _, _ = graph_cost(gm, rename)
    for length in (7, 10, 13):
        x = torch.randn(3, 4, length)
        out_length = (length - 1) // 2 + 1
        assert evaluate(total.flops, symbol_values(gm, [x], rename)) \
            == counted_flops(model, [x]) + 3 * 6 * out_length


class BatchedProducts(nn.Module):
    def forward(self, a_BMK, b_BKN, c_KN, v_K):
        products = torch.bmm(a_BMK, b_BKN), a_BMK @ c_KN, a_BMK @ v_K, v_K @ v_K
        return *products, torch.einsum("bmk,kn->bmn", a_BMK, c_KN)


def test_batched_and_broadcast_matmul():
    args = [torch.randn(3, 5, 4), torch.randn(3, 4, 6), torch.randn(4, 6), torch.randn(4)]
    gm, rename = capture(BatchedProducts(), args, {(0, 0): "batch", (1, 0): "batch"})
    (bmm,) = nodes_by_target(gm, torch.ops.aten.bmm.default)
    broadcast, matrix_vector, vector_vector = nodes_by_target(gm, torch.ops.aten.matmul.default)
    assert expand_equal(node_cost(bmm, rename).flops, 2 * batch * 5 * 4 * 6)
    assert expand_equal(node_cost(broadcast, rename).flops, 2 * batch * 5 * 4 * 6)
    assert expand_equal(node_cost(matrix_vector, rename).flops, 2 * batch * 5 * 4)
    assert node_cost(vector_vector, rename).flops == 2 * 4
    (einsum,) = nodes_by_target(gm, torch.ops.aten.einsum.default)
    assert expand_equal(node_cost(einsum, rename).flops, 2 * batch * 5 * 4 * 6)
    # torch's counter has no rule for the matrix-vector and vector-vector products
    total, _, _ = graph_cost(gm, rename)
    values = symbol_values(gm, args, rename)
    vector_products = node_cost(matrix_vector, rename).flops + node_cost(vector_vector, rename).flops
    assert evaluate(total.flops - vector_products, values) == counted_flops(BatchedProducts(), args)


def test_expanded_input_is_read_once():
    class SharedWeight(nn.Module):
        def forward(self, a_BMK, w_KN):
            return torch.bmm(a_BMK, w_KN.expand(a_BMK.shape[0], -1, -1))

    gm, rename = capture(SharedWeight(), [torch.randn(3, 5, 4), torch.randn(4, 6)], {(0, 0): "batch"})
    (bmm,) = nodes_by_target(gm, torch.ops.aten.bmm.default)
    # read a_BMK and w_KN once (not B times), write out_BMN
    assert expand_equal(node_cost(bmm, rename).bytes, 4 * (batch * 5 * 4 + 4 * 6 + batch * 5 * 6))


def test_embedding_reads_selected_rows_not_the_table():
    gm, rename = capture(nn.Embedding(1000, 16), [torch.randint(0, 1000, (2, 5))],
                         {(0, 0): "batch", (0, 1): "seq"})
    (embedding,) = nodes_by_target(gm, torch.ops.aten.embedding.default)
    cost = node_cost(embedding, rename)
    assert cost.flops == 0
    # int64 ids, then B·S rows of 16 floats read and written; the 1000-row table is not read
    assert expand_equal(cost.bytes, 8 * batch * seq + 2 * 4 * batch * seq * 16)


def test_static_capture_gives_integers():
    gm, rename = capture(HandAttention(), [torch.randn(2, 6, 16)])
    assert rename == {}
    total, per_node, _ = graph_cost(gm)
    assert total.flops.is_Integer and total.bytes.is_Integer
    assert all(cost.flops.is_Integer for cost in per_node.values())
    assert evaluate(total.flops, {}) == int(total.flops) > 0


class SharedDims(nn.Module):
    def forward(self, x_BSD, mask_BS):
        return x_BSD * mask_BS.unsqueeze(-1)


def test_rename_when_two_inputs_share_a_symbol():
    args = [torch.randn(2, 5, 8), torch.randn(2, 5)]
    gm, _ = capture(SharedDims(), args, {(0, 0): "batch", (0, 1): "seq", (1, 0): "batch",
                                         (1, 1): "seq"})
    # inputs named by index and by placeholder name; the mask's batch is left out on purpose:
    # it shares its symbol with x's batch, so one entry names both
    rename = rename_map_from_placeholders(gm, {(0, 0): "batch", (0, 1): "seq", ("mask_bs", 1): "seq"})
    assert sorted(map(str, rename.values())) == ["batch", "seq"]
    x_node, mask_node = [node for node in gm.graph.nodes if node.op == "placeholder"]
    assert sympy_shape(x_node.meta["val"], rename) == (batch, seq, 8)
    assert sympy_shape(mask_node.meta["val"], rename) == (batch, seq)
    total, _, _ = graph_cost(gm, rename)
    assert total.flops.free_symbols == {batch, seq}
    assert expand_equal(total.flops, batch * seq * 8)

    with pytest.raises(InputError, match="cannot also be named"):
        rename_map_from_placeholders(gm, {(0, 0): "batch", (1, 0): "rows"})
    with pytest.raises(InputError, match="another input says"):
        symbol_values(gm, [torch.randn(2, 5, 8), torch.randn(3, 5)], rename)


def test_uncounted_ops_are_named_and_their_bytes_kept():
    class TopK(nn.Module):
        def forward(self, x):
            return torch.topk(x, 2).values

    gm, rename = capture(TopK(), [torch.randn(3, 7)], {(0, 0): "batch"})
    total, _, uncounted = graph_cost(gm, rename)
    assert uncounted == ("aten.topk.default",)
    assert total.flops == 0
    # read x (B·7), write values and int64 indices (B·2 each)
    assert expand_equal(total.bytes, 4 * batch * 7 + 4 * batch * 2 + 8 * batch * 2)


def test_dtype_bytes_and_evaluate_errors():
    assert dtype_bytes(torch.bfloat16) == 2 and dtype_bytes(torch.int64) == 8
    assert dtype_bytes(torch.int4) == sympy.Rational(1, 2)
    assert tensor_bytes(torch.empty(3, 4, dtype=torch.float16)) == 24
    with pytest.raises(InputError, match="seq"):
        evaluate(batch * seq, {"batch": 2})


class Block(nn.Module):
    def __init__(self, width=64, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x_BSD):
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(self.norm1(x_BSD)).view(B, S, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x_BSD = x_BSD + self.proj(y.transpose(1, 2).reshape(B, S, D))
        return x_BSD + self.down(F.gelu(self.up(self.norm2(x_BSD))))


def test_ten_layer_transformer_costs_fast():
    model = nn.Sequential(*(Block() for _ in range(10)))
    gm, rename = capture(model, [torch.randn(2, 8, 64)], {(0, 0): "batch", (0, 1): "seq"})
    assert len(gm.graph.nodes) > 200
    start = time.perf_counter()
    total, _, uncounted = graph_cost(gm, rename)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"graph_cost took {elapsed:.2f} s"
    assert uncounted == ()
    assert total.flops.free_symbols == {batch, seq}
    D, tokens = 64, batch * seq
    linears = 2 * tokens * D * (3 * D + D + 4 * D + 4 * D) + tokens * (3 * D + D + 4 * D + D)
    causal_attention = 2 * batch * seq * (seq + 1) * D  # B·H·S(S+1)/2 pairs × 2·(E + Ev)
    norms, residuals, gelu = 2 * 7 * tokens * D, 2 * tokens * D, 8 * tokens * 4 * D
    assert expand_equal(total.flops, 10 * (linears + causal_attention + norms + residuals + gelu))
