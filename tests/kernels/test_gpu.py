"""The full grid on a CUDA GPU (marker `gpu`, skipped without one): compiled Triton kernels and the torch path against
the reference in fp32; in bf16 the rule is that our error against an fp32 reference is no larger than plain torch's
error in bf16 plus a small tolerance; and the memory of the fused loss stays a small fraction of plain torch's."""

from __future__ import annotations

import pytest
import torch
from lce_cases import (
    DENSITIES,
    OPTION_SETS,
    assert_matches,
    loss_and_grads,
    make_problem,
    naive_torch,
    ours,
    reference,
    relative_error,
)

pytestmark = pytest.mark.gpu

BATCH, TIME, HIDDEN, VOCAB = (
    2,
    515,
    384,
    4099,
)  # odd sizes; the default budget gives several chunks of each kind
CASES = [(density, "everything") for density in DENSITIES] + [("half", name) for name in OPTION_SETS]
# With no supervised token the relative error is undefined; the fp32 test covers that case (loss and gradients 0).
BF16_CASES = [case for case in CASES if case[0] != "all"]


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would blur the fp32 comparison
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def _problem(density, option_set, dtype, shape=(BATCH, TIME, HIDDEN, VOCAB)):
    return make_problem(
        *shape, density, device="cuda", dtype=dtype, bias=OPTION_SETS[option_set].get("bias", False)
    )


@pytest.mark.parametrize("weight_grad_pass", ["vocab", "rows", "rows_inplace"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize(("density", "option_set"), CASES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fp32_matches_reference(impl, density, option_set, reduction, weight_grad_pass):
    options = OPTION_SETS[option_set]
    problem = _problem(density, option_set, torch.float32)
    actual = loss_and_grads(ours(impl, weight_grad_pass=weight_grad_pass), *problem, reduction, options)
    assert_matches(actual, loss_and_grads(reference, *problem, reduction, options), rtol=1e-4, atol=1e-4)


def _bf16_rule(function, problem, reduction, options, tolerance=1e-3):
    exact = loss_and_grads(reference, *problem, reduction, options)
    low = [None if tensor is None else tensor.detach().bfloat16().requires_grad_() for tensor in problem[:3]]
    mine = loss_and_grads(function, *low, problem[3], reduction, options)
    plain = loss_and_grads(naive_torch, *low, problem[3], reduction, options)
    triples = [(mine[0], plain[0], exact[0]), *zip(mine[2], plain[2], exact[2], strict=True)]
    for value, plain_value, expected in triples:
        assert torch.isfinite(value).all()
        assert relative_error(value, expected) <= relative_error(plain_value, expected) + tolerance


@pytest.mark.parametrize("weight_grad_pass", ["vocab", "rows", "rows_inplace"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize(("density", "option_set"), BF16_CASES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bf16_no_worse_than_plain_torch(impl, density, option_set, reduction, weight_grad_pass):
    problem = _problem(density, option_set, torch.float32)
    _bf16_rule(ours(impl, weight_grad_pass=weight_grad_pass), problem, reduction, OPTION_SETS[option_set])


@pytest.mark.parametrize("vocab_size", [128256, 151936])
def test_bf16_large_vocabulary(vocab_size):
    problem = make_problem(2, 2048, 1024, vocab_size, "half", device="cuda")
    _bf16_rule(ours("auto"), problem, "sum", OPTION_SETS["everything"])


def _fp32_check(weight_grad_pass="vocab"):
    options = OPTION_SETS["everything"]
    problem = _problem("half", "everything", torch.float32)
    actual = loss_and_grads(ours("triton", weight_grad_pass=weight_grad_pass), *problem, "sum", options)
    assert_matches(actual, loss_and_grads(reference, *problem, "sum", options), rtol=1e-4, atol=1e-4)


def test_autotuning_from_scratch_restores_the_chunk(monkeypatch):
    """A first call per key benchmarks every configuration on the chunk it overwrites: the result must still be right."""
    from ift_dist.kernels import triton_logits

    monkeypatch.setenv("IFT_TUNE_ROW_KERNEL", "1")  # the row kernel is tuned only on request

    for tuned in (triton_logits._row_loss_tuned, triton_logits._dlogits_tuned):
        tuned.cache.clear()
    _fp32_check()
    assert triton_logits._row_loss_tuned.cache and triton_logits._dlogits_tuned.cache


@pytest.mark.parametrize("kernel", ["row", "dlogits"])
@pytest.mark.parametrize("index", range(5))
def test_every_autotune_configuration_matches_reference(monkeypatch, kernel, index):
    """Each candidate alone, so a wrong one fails here even where the tuner would not pick it on this GPU."""
    import triton

    from ift_dist.kernels import triton_logits

    name, configs = {
        "row": ("_row_loss_tuned", triton_logits.ROW_CONFIGS),
        "dlogits": ("_dlogits_tuned", triton_logits.DLOGITS_CONFIGS),
    }[kernel]
    if index >= len(configs):
        pytest.skip("fewer configurations")
    monkeypatch.setenv("IFT_TUNE_ROW_KERNEL", "1")  # the row kernel is tuned only on request
    tuned = getattr(triton_logits, name)
    single = triton.autotune(configs=[configs[index]], key=tuned.keys)(tuned.fn)
    monkeypatch.setattr(triton_logits, name, single)
    _fp32_check("vocab" if kernel == "dlogits" else "rows")


def test_memory_is_a_small_fraction_of_plain_torch():
    from kernels_measure import Case, measure_here

    results = {
        impl: measure_here(Case(8192, 2048, 32000, "bfloat16", 0.0, impl, "cuda", warmup=1, repeats=1))
        for impl in ("ours", "torch")
    }
    assert results["ours"]["status"] == results["torch"]["status"] == "ok", results
    assert results["ours"]["peak_mib"] <= 0.1 * results["torch"]["peak_mib"], results
