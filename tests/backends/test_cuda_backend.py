"""The CUDA backend's parts that run without a GPU.

* ``require_cuda`` and ``optimize(target="cuda")`` without a GPU: a BackendError that says what to use;
* ``build`` on the CPU with a stand-in compiler: the private copy, the compile fallback and its report;
* ``GraphRunner.signature``: one key per static input signature;
* the fused decode kernels under ``TRITON_INTERPRET=1`` (fp32, CPU) against torch, outputs poisoned;
* ``StaticDecoder`` on tiny Llama / GPT models: its prefill against the model, its greedy tokens
  against ``slimline.generate`` (the torch loop), the tuner's choice, and its refusals.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import slimline  # noqa: E402
from slimline.backends import cuda  # noqa: E402
from slimline.backends.cuda.graphs import signature  # noqa: E402
from slimline.errors import BackendError, InputError  # noqa: E402
from slimline.ir.capture import capture  # noqa: E402

KERNELS = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                             reason="needs a GPU or the Triton interpreter")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _graph():
    torch.manual_seed(0)
    model = TwoLayer().eval()
    x = torch.randn(2, 8)
    return model, x, capture(model, (x,), {})


def test_without_gpu_require_cuda_and_optimize_say_what_to_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendError, match="target='cpu' or target='onnxruntime'"):
        cuda.require_cuda()
    model, x, _ = _graph()
    with pytest.raises(BackendError, match="needs an NVIDIA GPU"):
        slimline.optimize(model, (x,), target="cuda")


def test_build_compiles_a_private_copy():
    model, x, graph = _graph()
    seen = []

    def compiler(module, mode):
        seen.append((module, mode))
        return module

    runner, facts = cuda.build(graph, device="cpu", compiler=compiler)
    assert len(seen) == 1 and seen[0][1] == "default"
    compiled_module = seen[0][0]
    assert compiled_module is not graph.module  # a deep copy
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(compiled_module.parameters(), graph.module.parameters()))
    assert facts["fallbacks"] == [] and facts["runtime"].startswith("torch.compile (inductor, default)")
    torch.testing.assert_close(runner(x), model(x))


def test_build_falls_back_to_eager_when_compile_fails_and_says_why():
    model, x, graph = _graph()

    def broken(module, mode):
        def call(*args, **kwargs):
            raise RuntimeError("inductor: no such lowering")
        return call

    runner, facts = cuda.build(graph, device="cpu", compiler=broken, compile_mode="max-autotune-no-cudagraphs")
    assert len(facts["fallbacks"]) == 1 and "no such lowering" in facts["fallbacks"][0]
    assert facts["runtime"].startswith("torch eager") and "fallback" in facts["runtime"]
    torch.testing.assert_close(runner(x), model(x))
    weight = model.up.weight.detach().clone()
    runner(x * 3)
    assert torch.equal(model.up.weight, weight)  # the user's model untouched


def test_build_rejects_an_unknown_compile_mode():
    _, _, graph = _graph()
    with pytest.raises(BackendError, match="unknown compile mode"):
        cuda.build(graph, device="cpu", compile_mode="fastest")


def test_signature_keys_by_shape_dtype_and_values():
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert signature((a,), {}) == signature((b,), {})
    assert signature((a,), {}) != signature((torch.zeros(3, 3),), {})
    assert signature((a,), {}) != signature((a.half(),), {})
    assert signature((a, 1), {}) != signature((a, 2), {})
    assert signature((a,), {"flag": True}) != signature((a,), {"flag": False})


# -- the fused decode kernels (interpreter on CPU) -----------------------------------------------------

def _poisoned(shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@KERNELS
@pytest.mark.parametrize("variant", ["plain", "rms+residual", "layer+gelu", "silu_pair", "uneven"])
def test_gemv_variants_match_torch(variant):
    from slimline.backends.cuda import decode_kernels as k

    generator = torch.Generator().manual_seed(1)
    K, N = (96, 37) if variant == "uneven" else (128, 32)
    rand = lambda *shape: torch.randn(*shape, generator=generator).to(DEVICE)  # noqa: E731
    x, g, b, r = rand(K), rand(K), rand(K), rand(N)
    weight = rand(2 * N if variant == "silu_pair" else N, K) * 0.1
    out = _poisoned((N,))
    config = k.GemvConfig(8, 32, 4)
    if variant in ("plain", "uneven"):
        k.gemv(x, weight, out, config=config)
        expected = weight @ x
    elif variant == "rms+residual":
        k.gemv(x, weight, out, norm=k.NORM_RMS, norm_weight=g, eps=1e-6, residual=r, config=config)
        expected = r + weight @ (g * x * torch.rsqrt(x.pow(2).mean() + 1e-6))
    elif variant == "layer+gelu":
        k.gemv(x, weight, out, norm=k.NORM_LAYER, norm_weight=g, norm_bias=b, eps=1e-5, act=k.ACT_GELU,
               config=config)
        expected = torch.nn.functional.gelu(weight @ torch.nn.functional.layer_norm(x, (K,), g, b, 1e-5))
    else:
        k.gemv(x, weight, out, act=k.ACT_SILU_PAIR, config=config)
        both = weight @ x
        expected = torch.nn.functional.silu(both[:N]) * both[N:]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@KERNELS
@pytest.mark.parametrize("position", [0, 129, 200])
def test_static_decode_attention_writes_the_slot_and_attends_up_to_position(position):
    from slimline.backends.cuda import decode_kernels as k
    from slimline.kv.decoders import rotate

    generator = torch.Generator().manual_seed(position)
    H, Hkv, D, S = 4, 2, 16, 257
    qkv = torch.randn((H + 2 * Hkv) * D, generator=generator).to(DEVICE)
    keys = torch.randn(Hkv, S, D, generator=generator).to(DEVICE)
    values = torch.randn(Hkv, S, D, generator=generator).to(DEVICE)
    before = keys.clone(), values.clone()
    angles = torch.rand(S, D // 2, generator=generator).repeat(1, 2).to(DEVICE) * 3
    cos, sin = angles.cos(), angles.sin()
    out = _poisoned((H * D,))
    partials = k.attention_partials(H, S, D, torch.device(DEVICE))
    k.static_decode_attention(qkv, keys, values, cos, sin, torch.tensor([position], device=DEVICE), out,
                              partials, H, Hkv, D ** -0.5)
    assert not partials[3].any()  # the last split of each head reset its counter
    q, kn, vn = qkv.split([H * D, Hkv * D, Hkv * D])
    q = rotate(q.view(H, D), cos[position], sin[position])
    kn = rotate(kn.view(Hkv, D), cos[position], sin[position])
    torch.testing.assert_close(keys[:, position], kn)
    torch.testing.assert_close(values[:, position], vn.view(Hkv, D))
    untouched = [s for s in range(S) if s != position]
    assert torch.equal(keys[:, untouched], before[0][:, untouched])
    visible_k = keys[:, : position + 1].repeat_interleave(H // Hkv, 0)  # (H, P, D)
    visible_v = values[:, : position + 1].repeat_interleave(H // Hkv, 0)
    probs = torch.softmax((visible_k @ q[:, :, None])[..., 0] * D ** -0.5, dim=-1)  # (H, P)
    expected = (probs[:, None, :] @ visible_v)[:, 0].reshape(-1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@KERNELS
def test_advance_takes_the_first_maximum_moves_on_and_embeds_it():
    from slimline.backends.cuda import decode_kernels as k

    generator = torch.Generator().manual_seed(4)
    V, C = 300, 24
    logits = torch.randn(V, generator=generator).to(DEVICE)
    logits[[17, 250]] = logits.max() + 1  # a tie: argmax takes the first
    embedding = torch.randn(V, C, generator=generator).to(DEVICE)
    x, token = _poisoned((C,)), torch.zeros(1, dtype=torch.int64, device=DEVICE)
    position = torch.tensor([5], device=DEVICE)
    history = torch.full((9,), -1, dtype=torch.int64, device=DEVICE)
    k.advance(logits, embedding, x, token, position, history)
    assert int(token) == int(torch.argmax(logits)) == 17
    assert int(position) == 6 and history.tolist() == [-1] * 6 + [17] + [-1] * 2
    assert torch.equal(x, embedding[17])


# -- StaticDecoder ---------------------------------------------------------------------------------

def _tiny_llama(**overrides):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, vocab_size=64,
                                      max_position_embeddings=128, **overrides)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _small_configs(decoder):
    from slimline.backends.cuda.decode_kernels import GemvConfig

    decoder.configs = {name: GemvConfig(8, 32, 4) for name in decoder.configs}


def test_fused_prefill_matches_the_model_and_copies_weights():
    from slimline.backends.cuda.decoder import fuse_weights

    model = _tiny_llama()
    fused = fuse_weights(model, 64)
    prompt = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    logits, keys, values = fused(prompt)
    with torch.no_grad():
        expected = model(prompt).logits[:, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert keys.shape == values.shape == (1, 2, 2, 9, 8)
    own = {t.data_ptr() for t in model.parameters()}
    assert not any(t.data_ptr() in own for layer in fused.layers for t in (layer.qkv, layer.o, layer.up, layer.down))
    assert fused.embedding.data_ptr() not in own


@KERNELS
def test_static_decoder_generates_what_the_torch_loop_generates_llama():
    from slimline.backends.cuda.decoder import StaticDecoder
    from slimline.generate import generate

    model = _tiny_llama()
    prompt = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(2))
    decoder = StaticDecoder(model, 16, tune=False)
    _small_configs(decoder)
    tokens = decoder.generate(prompt, 5)
    assert tokens.tolist() == generate(model, prompt, 5).tolist()
    with torch.no_grad():  # the last step's logits are the model's at that position
        expected = model(tokens[:, :-1]).logits[0, -1]
    torch.testing.assert_close(decoder.logits, expected, rtol=1e-4, atol=1e-4)


@KERNELS
def test_static_decoder_generates_what_the_torch_loop_generates_gpt():
    from slimline.backends.cuda.decoder import StaticDecoder
    from slimline.generate import generate
    from slimline.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(context_length=64, n_layer=1, n_head=2, d_model=32)).eval()
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    decoder = StaticDecoder(model, 12, tune=False)
    _small_configs(decoder)
    assert decoder.generate(prompt, 4).tolist() == generate(model, prompt, 4).tolist()


@KERNELS
def test_tune_keeps_the_fastest_config_per_family():
    from slimline.backends.cuda.decode_kernels import GemvConfig
    from slimline.backends.cuda.decoder import StaticDecoder

    decoder = StaticDecoder(_tiny_llama(), 8, tune=False)
    slow, fast = GemvConfig(8, 32, 4), GemvConfig(4, 32, 4)
    calls = []

    def measure(run):  # a stand-in clock: the config with block_n 4 is "faster"
        calls.append(run)
        run()
        return 1.0 if decoder._last_block_n == 4 else 2.0

    from slimline.backends.cuda import decode_kernels

    original = decode_kernels.gemv

    def spy(*args, config, **kwargs):
        decoder._last_block_n = config.block_n
        return original(*args, config=config, **kwargs)

    decoder.kernels = type("K", (), {**{n: getattr(decode_kernels, n) for n in decode_kernels.__all__},
                                     "gemv": staticmethod(spy)})
    decoder.tune(measure=measure, candidates=(slow, fast))
    assert len(calls) == 2 * 5
    assert all(config == fast for config in decoder.configs.values())
    assert set(decoder.report["gemv_timings_ms"]) == {"qkv", "o", "up", "down", "head"}


def test_static_decoder_refusals():
    from slimline.backends.cuda.decoder import StaticDecoder, fuse_weights

    with pytest.raises(BackendError, match="bias"):
        fuse_weights(_tiny_llama(attention_bias=True), 16)
    with pytest.raises(InputError, match="exceeds"):
        fuse_weights(_tiny_llama(), 1000)
    with pytest.raises(InputError, match="no cached decode loop"):
        fuse_weights(torch.nn.Linear(2, 2), 16)
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        decoder = StaticDecoder(_tiny_llama(), 16, tune=False)
        with pytest.raises(InputError, match="batch 1"):
            decoder.prefill(torch.zeros(2, 3, dtype=torch.int64))
        with pytest.raises(InputError, match="exceed max_length"):
            decoder.generate(torch.zeros(1, 10, dtype=torch.int64), 10)


def test_graph_runner_runs_eagerly_and_says_why_when_capture_fails():
    from slimline.backends.cuda.graphs import GraphRunner

    calls = []

    def fn(x, scale=1.0):
        calls.append(x.shape)
        return x * scale

    runner = GraphRunner(fn, torch.device("cpu"))  # no CUDA stream here: capture fails, calls still work
    torch.testing.assert_close(runner(torch.ones(2), scale=3.0), torch.full((2,), 3.0))
    torch.testing.assert_close(runner(torch.ones(2), scale=3.0), torch.full((2,), 3.0))
    assert runner.counts == {"replays": 0, "eager_calls": 2, "captures": 0}
    assert len(runner.eager) == 1  # one signature, one reason, not retried


# -- low-rank mode -------------------------------------------------------------------------------

def test_truncated_svd_is_exact_at_full_rank_and_optimal_below():
    from slimline.backends.cuda.decoder import rank_for, truncated_svd

    generator = torch.Generator().manual_seed(6)
    for shape in ((24, 10), (10, 24)):
        weight = torch.randn(*shape, generator=generator)
        u, v = truncated_svd(weight, 10)
        torch.testing.assert_close(u @ v, weight, rtol=1e-5, atol=1e-5)
        u, v = truncated_svd(weight, 4)
        assert u.shape == (shape[0], 4) and v.shape == (4, shape[1])
        singular = torch.linalg.svdvals(weight.double())
        error = torch.linalg.matrix_norm((u @ v - weight).double())  # Eckart-Young: the tail's energy
        torch.testing.assert_close(error, singular[4:].pow(2).sum().sqrt(), rtol=1e-6, atol=1e-6)
    assert rank_for((6144, 2048), 0.5) == 768 and rank_for((2048, 2048), 0.5) == 512
    assert rank_for((11264, 2048), 0.5) == 864  # 866 rounded down to a multiple of 32


def test_lowrank_weights_hold_the_fraction_asked_and_prefill_through_factors():
    from slimline.backends.cuda.decoder import factorise, fuse_weights

    model = _tiny_llama()
    dense = fuse_weights(model, 32)
    fused = fuse_weights(model, 32)
    report = factorise(fused, rank_fraction=0.5)
    for name, family in report["families"].items():
        assert family["params_factors"] <= 0.5 * family["params_dense"]
        N, K = family["shape"]
        assert (family["rank"] + 1) * (N + K) > 0.5 * N * K  # the largest rank inside the budget
        assert fused.layers[0].factors[name][0].shape == (N, family["rank"]) and getattr(fused.layers[0], name) is None
    assert report["fraction_layers"] <= 0.5
    assert fused.linear_params()["layers"] == report["linear_params_after"]["layers"]
    assert fused.weight_bytes() < dense.weight_bytes()
    full = fuse_weights(model, 32)
    factorise(full, ranks=10_000)  # capped at min(N, K): the pairs reproduce the matrices
    prompt = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(full(prompt)[0], dense(prompt)[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fused(prompt)[0], dense(prompt)[0], rtol=1e-3, atol=1e-3)
    with pytest.raises(InputError, match="rank_fraction"):
        factorise(fuse_weights(model, 32), rank_fraction=1.5)


@KERNELS
@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_lowrank_decoder_at_full_rank_reproduces_the_dense_decoder(family):
    from slimline.backends.cuda.decoder import StaticDecoder
    from slimline.models.gpt import GPT, GPTConfig

    if family == "llama":
        model, vocab = _tiny_llama(), 64
    else:
        torch.manual_seed(0)
        model, vocab = GPT(GPTConfig(context_length=64, n_layer=1, n_head=2, d_model=32)).eval(), 256
    prompt = torch.randint(0, vocab, (1, 6), generator=torch.Generator().manual_seed(7))
    dense = StaticDecoder(model, 12, tune=False)
    full = StaticDecoder(model, 12, tune=False, ranks=10_000)
    half = StaticDecoder(model, 12, tune=False, rank_fraction=0.5)
    for decoder in (dense, full, half):
        _small_configs(decoder)
    assert full.stages["up"] == ["up.v", "up.u"] and dense.stages["up"] == ["up"]
    assert full.report["launches_per_step"] == dense.report["launches_per_step"] + 4
    tokens = dense.generate(prompt, 4)
    assert full.generate(prompt, 4).tolist() == tokens.tolist()
    torch.testing.assert_close(full.logits, dense.logits, rtol=1e-4, atol=1e-4)
    half_tokens = half.generate(prompt, 4)  # a different model: its own prefill form is the reference
    with torch.no_grad():
        expected = half.weights(half_tokens[:, :-1])[0][0]
    torch.testing.assert_close(half.logits, expected, rtol=1e-4, atol=1e-4)
    assert half.report["lowrank"]["fraction_layers"] <= 0.5


_HOPPER_PTX = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from slimline.backends.cuda import decode_kernels as k

def ptx(kernel, types, constants, num_warps):
    signature = {arg: "constexpr" if arg in constants else types.get(arg, "i32") for arg in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names) if arg.endswith("_ptr")}
    return triton.compile(ASTSource(kernel, signature, constants, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps}).asm["ptx"]

try:
    attention = ptx(k._attention_kernel, {
        "qkv_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16",
        "position_ptr": "*i64", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "counter_ptr": "*i32",
        "out_ptr": "*bf16", "scale": "fp32"}, dict(H=4, HKV=2, D=16, BLOCK_S=64, BLOCKS_PER_SPLIT=1, BLOCK_P=4,
                                                   USE_PDL=k.PDL_AVAILABLE), 4)
    advance = ptx(k._advance_kernel, {"logits_ptr": "*bf16", "embedding_ptr": "*bf16", "x_ptr": "*bf16",
                                      "token_ptr": "*i64", "position_ptr": "*i64", "history_ptr": "*i64"},
                  dict(V=300, C=24, BLOCK_V=512, BLOCK_C=32, USE_PDL=k.PDL_AVAILABLE), 8)
except Exception as error:  # no NVIDIA backend or ptxas here
    print(json.dumps({"skip": f"{type(error).__name__}: {error}"[:300]}))
    sys.exit(0)
print(json.dumps({"attention": attention, "advance": advance, "pdl": k.PDL_AVAILABLE}))
"""


def test_decode_kernels_compile_for_hopper_with_the_ordering_the_combine_needs():
    """sm_90 ahead of time, no GPU needed (a child process: the interpreter is off there): the attention's
    count is one acq_rel atomic after a barrier and the merge reads the partials past L1; advance waits
    for its predecessor and never lets its dependents start early."""
    import json
    import subprocess
    import sys

    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, "-c", _HOPPER_PTX], capture_output=True, text=True, env=environment,
                           timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    lines = [line.strip() for line in result["attention"].splitlines()]
    count = next(i for i, line in enumerate(lines) if "atom.global.gpu.acq_rel.add" in line)
    stores = [i for i, line in enumerate(lines[:count]) if line.lstrip("@%p0123456789 ").startswith("st.global")]
    barriers = [i for i, line in enumerate(lines[:count]) if line.startswith("bar.sync")]
    assert stores and barriers and barriers[-1] > stores[-1]  # every thread's partials are stored before the count
    merge_loads = [line for line in lines[count:] if "ld.global" in line]
    assert merge_loads and all("ld.global.cg" in line for line in merge_loads)
    if result["pdl"]:
        assert "griddepcontrol.wait" in result["advance"]
        assert "griddepcontrol.launch_dependents" not in result["advance"]
