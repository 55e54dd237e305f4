"""Search spaces derived on the fixed H200 description: sizes, legality, the bounds."""

import math

import pytest

from slimline.autotune.space import FAMILIES, H200, DeviceLimits, Problem, family, row_bucket
from slimline.errors import ConfigError

LLAMA_1B = [(6144, 2048), (2048, 2048), (11264, 2048), (2048, 5632), (32000, 2048)]  # (N, K)


def _dense_legal(config, problem, limits):
    M, N, K = problem["M"], problem["N"], problem["K"]
    shared = config["num_stages"] * (config["block_m"] + config["block_n"]) * config["block_k"] * 2
    tiles = math.ceil(M / config["block_m"]) * math.ceil(N / config["block_n"])
    return (shared <= limits.shared_per_block
            and config["block_m"] <= max(16, 2 ** math.ceil(math.log2(M)))
            and (config["split_k"] == 1 or tiles < limits.multiprocessors))


@pytest.mark.parametrize("rows", [1, 4096])
@pytest.mark.parametrize("n,k", LLAMA_1B)
def test_dense_space_sizes_and_bounds(rows, n, k):
    dense = family("dense_matmul")
    problem = Problem.make("dense_matmul", M=rows, N=n, K=k, dtype="bf16")
    lite, wide = dense.candidates(problem, H200, "lite"), dense.candidates(problem, H200, "max")
    assert 8 <= len(lite) <= 10 and len(wide) > 2 * len(lite)
    assert lite[0] == wide[0] == dense.incumbent(problem, H200)        # cuBLAS is always measured
    assert set(lite) <= set(wide) and len(set(wide)) == len(wide)
    for candidate in wide[1:]:
        assert _dense_legal(candidate.as_dict(), problem, H200), candidate.label
    if rows == 1:
        assert all(c.as_dict()["block_m"] == 16 for c in wide[1:])


def test_smaller_shared_memory_prunes_deep_pipelines():
    small = DeviceLimits("small", "8.6", 84, 101376, 65536, 6 * 2 ** 20, 24 * 2 ** 30, 150.0, 900.0)
    dense = family("dense_matmul")
    problem = Problem.make("dense_matmul", M=4096, N=4096, K=4096, dtype="bf16")
    assert len(dense.legal(problem, small)) < len(dense.legal(problem, H200))
    for _, candidate in dense.legal(problem, small):
        assert _dense_legal(candidate.as_dict(), problem, small)


def test_split_k_only_when_the_tiles_cannot_fill_the_sms():
    dense = family("dense_matmul")
    wide_n = Problem.make("dense_matmul", M=1, N=32000, K=2048, dtype="bf16")
    assert all(c.as_dict()["split_k"] == 1 for _, c in dense.legal(wide_n, H200)
               if 32000 / c.as_dict()["block_n"] >= H200.multiprocessors)
    narrow = Problem.make("dense_matmul", M=1, N=2048, K=5632, dtype="bf16")
    assert any(c.as_dict().get("split_k", 1) > 1 for c in dense.candidates(narrow, H200, "lite"))


@pytest.mark.parametrize("rows", [1, 4096])
@pytest.mark.parametrize("bits,group", [(4, 128), (8, 0)])
def test_quant_space(rows, bits, group):
    quant = family("quant_matmul")
    problem = Problem.make("quant_matmul", M=rows, N=6144, K=2048, bits=bits, group=group, dtype="bf16")
    lite, wide = quant.candidates(problem, H200, "lite"), quant.candidates(problem, H200, "max")
    assert 8 <= len(lite) <= 10 and len(wide) > len(lite) and set(lite) <= set(wide)
    for candidate in wide[1:]:
        config = candidate.as_dict()
        assert config["block_n"] * config["block_k"] / (32 * config["num_warps"]) <= 128
        assert (config["block_m"] == 16) == (rows <= 16)
        assert config["split_k"] == 1 or rows <= 16
    assert quant.perf_model_pick(problem, H200) in wide


@pytest.mark.parametrize("rows", [1, 4096])
@pytest.mark.parametrize("n,k", [(2048, 2048), (11264, 2048), (2048, 5632)])
def test_monarch_space_is_legal_for_the_kernel(rows, n, k):
    pytest.importorskip("triton")
    from slimline.backends.cuda.monarch_kernel import KernelConfig, check_config

    monarch = family("monarch_matmul")
    problem = Problem.make("monarch_matmul", M=rows, N=n, K=k, nblocks=4, dtype="bf16")
    lite, wide = monarch.candidates(problem, H200, "lite"), monarch.candidates(problem, H200, "max")
    assert 2 <= len(lite) <= 10 and len(wide) > len(lite) and set(lite) <= set(wide)
    shape = monarch._shape(problem)
    for candidate in wide[1:]:
        fields = {key: value for key, value in candidate.as_dict().items() if key != "impl"}
        assert check_config(KernelConfig(**fields), shape) == []


def test_problem_keys_bucket_rows_and_name_dtypes():
    assert [row_bucket(m) for m in (1, 2, 16, 17, 4096, 4097)] == [1, 16, 16, 32, 4096, 8192]
    dense = family("dense_matmul")
    key = dense.problem_key(Problem.make("dense_matmul", M=3, N=64, K=32, dtype="fp16"))
    assert key == "M16-N64-K32-fp16-x_MK.w_NK"
    assert key == dense.problem_key(Problem.make("dense_matmul", M=9, N=64, K=32, dtype="fp16"))
    with pytest.raises(ConfigError, match="unknown kernel family"):
        family("nope")


def test_h200_description_and_fingerprint():
    assert H200.fingerprint.slug == "nvidia-h200-sm90-132sm-140gib"
    assert set(FAMILIES) >= {"dense_matmul", "monarch_matmul", "quant_matmul", "cpu_linear"}
