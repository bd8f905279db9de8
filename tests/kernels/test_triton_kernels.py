"""The Triton kernels on CPU: run through Triton's interpreter in fp32 on small odd shapes against the reference, and
compiled ahead of time for Hopper and Ampere so a compile error shows here, not on a GPU.

CPU tensors with impl="triton" go through the interpreter without TRITON_INTERPRET being set (triton_logits wraps
its kernels itself), so nothing leaks into the other tests of the same process; one test also runs the classic way,
TRITON_INTERPRET=1 in a subprocess."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from lce_cases import DENSITIES, OPTION_SETS, assert_matches, loss_and_grads, make_problem, ours, reference

from ift_dist.kernels.triton_logits import DLOGITS_CONFIGS, ROW_CONFIGS

# N = 3 x 47 tokens, H = 31, V = 123: nothing is a power of two. A 16-row budget gives 9 row chunks (the last partial)
# and 10-13 vocabulary chunks, so every offset and mask path of the kernels runs.
BATCH, TIME, HIDDEN, VOCAB = 3, 47, 31, 123
CHUNK_ELEMENTS = 16 * VOCAB


def _compare(density, reduction, options, weight_grad_pass):
    hidden, weight, bias, labels = make_problem(
        BATCH, TIME, HIDDEN, VOCAB, density, bias=options.get("bias", False)
    )
    fused = ours("triton", weight_grad_pass=weight_grad_pass, chunk_elements=CHUNK_ELEMENTS)
    actual = loss_and_grads(fused, hidden, weight, bias, labels, reduction, options)
    expected = loss_and_grads(reference, hidden, weight, bias, labels, reduction, options)
    assert_matches(actual, expected)
    return actual


@pytest.mark.parametrize("weight_grad_pass", ["vocab", "rows", "rows_inplace"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("density", DENSITIES)
def test_interpreted_kernels_match_reference(density, reduction, weight_grad_pass):
    loss, _, grads = _compare(density, reduction, OPTION_SETS["everything"], weight_grad_pass)
    if density == "all":
        assert (loss == 0).all() and all((gradient == 0).all() for gradient in grads)


@pytest.mark.parametrize("option_set", sorted(OPTION_SETS))
def test_interpreted_kernels_each_option(option_set):
    _compare("half", "sum", OPTION_SETS[option_set], "vocab")


def test_environment_variable_interpreter_in_subprocess():
    """TRITON_INTERPRET=1 set before triton is imported (so @triton.jit itself interprets) gives the same result."""
    code = textwrap.dedent(
        f"""
        import torch
        from lce_cases import OPTION_SETS, assert_matches, loss_and_grads, make_problem, ours, reference
        hidden, weight, bias, labels = make_problem({BATCH}, {TIME}, {HIDDEN}, {VOCAB}, "half", bias=True)
        options = OPTION_SETS["everything"]
        actual = loss_and_grads(ours("triton", chunk_elements={CHUNK_ELEMENTS}), hidden, weight, bias, labels,
                                "mean", options)
        assert_matches(actual, loss_and_grads(reference, hidden, weight, bias, labels, "mean", options))
        import triton.runtime.interpreter as interpreter
        from ift_dist.kernels import triton_logits
        assert isinstance(triton_logits._row_loss_kernel, interpreter.InterpretedFunction)
        print("ok")
        """
    )
    environment = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-c", code],
        cwd=os.path.dirname(__file__),
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().endswith("ok")


def test_interpreter_does_not_leak_into_this_process():
    import triton

    from ift_dist.kernels import triton_logits

    before = os.environ.get("TRITON_INTERPRET")
    hidden, weight, _, labels = make_problem(1, 5, 4, 9, "none")
    ours("triton")(hidden, weight, labels).backward()
    assert os.environ.get("TRITON_INTERPRET") == before
    if before in (None, "", "0"):
        # The module's kernels stay compiled-GPU kernels; only private twins were interpreted.
        assert isinstance(triton_logits._row_loss_kernel, triton.runtime.JITFunction)
        assert isinstance(triton_logits._dlogits_kernel, triton.runtime.JITFunction)


@pytest.mark.parametrize("capability", [90, 80])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_gpu(capability, dtype):
    """Full compile (Triton IR -> PTX -> cubin with the bundled ptxas) without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ift_dist.kernels import triton_logits

    if not isinstance(triton_logits._row_loss_kernel, triton.runtime.JITFunction):
        pytest.skip(
            "TRITON_INTERPRET=1 was set before triton_logits was imported: its kernels are interpreted"
        )
    scalars = {"target_weight": "fp32", "smoothing_per_class": "fp32", "z_loss": "fp32", "softcap": "fp32"}
    row_signature = {
        "logits_ptr": f"*{dtype}",
        "stride_row": "i32",
        "labels_ptr": "*i64",
        "scale_ptr": "*fp32",
        "lse_ptr": "*fp32",
        "loss_ptr": "*fp32",
        "z_loss_ptr": "*fp32",
        "vocab_size": "i32",
        **scalars,
        "HAS_SOFTCAP": "constexpr",
        "COMPUTE_GRAD": "constexpr",
        "BLOCK_V": "constexpr",
    }
    dlogits_signature = {
        "logits_ptr": f"*{dtype}",
        "stride_row": "i32",
        "n_rows": "i32",
        "n_columns": "i32",
        "col_start": "i32",
        "labels_ptr": "*i64",
        "scale_ptr": "*fp32",
        "lse_ptr": "*fp32",
        **scalars,
        "HAS_SOFTCAP": "constexpr",
        "BLOCK_R": "constexpr",
        "BLOCK_C": "constexpr",
    }
    target = GPUTarget("cuda", capability, 32)
    # Every autotune candidate for Hopper in bf16 (the training case); the first one elsewhere.
    every_config = capability == 90 and dtype == "bf16"
    sources = [
        (
            triton_logits._row_loss_kernel,
            row_signature,
            {"HAS_SOFTCAP": True, "COMPUTE_GRAD": True},
            ROW_CONFIGS,
        ),
        (triton_logits._dlogits_kernel, dlogits_signature, {"HAS_SOFTCAP": True}, DLOGITS_CONFIGS),
    ]
    for kernel, signature, constexprs, configs in sources:
        for config in configs if every_config else configs[:1]:
            compiled = triton.compile(
                ASTSource(fn=kernel, signature=signature, constexprs={**constexprs, **config.kwargs}),
                target=target,
                options={"num_warps": config.num_warps},
            )
            assert len(compiled.asm["cubin"]) > 1000


def test_launch_configuration_per_device(monkeypatch):
    """CPU tensors: the interpreted kernels with one small fixed configuration. CUDA: autotuned kernels whose key
    leaves out the row count (it changes every batch) and which restore the chunk they overwrite between trials; the
    row kernel (a reduction: its configuration sets the summation order) only with IFT_TUNE_ROW_KERNEL=1, else a
    configuration fixed by the vocabulary size, the same in every process."""
    import triton

    from ift_dist.kernels import triton_logits

    kernel, meta = triton_logits.row_launch(torch.device("cuda"), 128256)
    assert kernel is triton_logits._row_loss_kernel and meta == {"BLOCK_V": 4096, "num_warps": 8}
    assert triton_logits.row_launch(torch.device("cuda"), 1000)[1] == {"BLOCK_V": 1024, "num_warps": 8}
    monkeypatch.setenv("IFT_TUNE_ROW_KERNEL", "1")
    for launch, fixed in (
        (functools.partial(triton_logits.row_launch, vocab_size=1000), triton_logits.INTERPRETER_ROW_META),
        (triton_logits.dlogits_launch, triton_logits.INTERPRETER_DLOGITS_META),
    ):
        kernel, meta = launch(torch.device("cpu"))
        assert meta == fixed and not isinstance(kernel, triton.runtime.Autotuner)
        tuned, meta = launch(torch.device("cuda"))
        assert meta == {} and isinstance(tuned, triton.runtime.Autotuner)
        assert tuned.restore_value == ["logits_ptr"]
        assert set(tuned.keys) <= set(tuned.arg_names)
        assert not {"n_rows", "stride_row"} & set(tuned.keys)
        assert len(tuned.configs) == len(set(map(str, tuned.configs))) >= 2
        for config in tuned.configs:
            assert set(config.kwargs) == set(fixed)  # the same meta-parameters the interpreter fixes
            for value in (*config.kwargs.values(), config.num_warps):
                assert value & (value - 1) == 0, config  # powers of two


def test_triton_forced_on_cpu_runs_interpreter_and_matches_torch_path():
    hidden, weight, _, labels = make_problem(2, 9, 8, 37, "half")
    with torch.no_grad():
        triton_loss = ours("triton")(hidden, weight, labels, reduction="none")
        torch_loss = ours("torch")(hidden, weight, labels, reduction="none")
    torch.testing.assert_close(triton_loss, torch_loss)


def test_autotuning_restores_the_chunk_it_overwrites(monkeypatch):
    """The tuner's trial runs overwrite the logits chunk in place; with `restore_value` the final run still sees the
    raw logits. Run on CPU: the same Autotuner, the interpreted kernels, a timer that runs each candidate three times
    (the trial runs) and ranks them by a fixed order instead of measuring."""
    import triton

    from ift_dist.kernels import triton_logits

    interpreted = triton_logits._interpreted_kernels()
    trials = []

    def timer(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        trials.append(len(trials))
        return [float(len(trials) % 2)] * len(quantiles)  # every second candidate looks faster

    def tuned(kernel, real, blocks):
        configs = [triton.Config(dict(zip(real.configs[0].kwargs, block, strict=True))) for block in blocks]
        return triton.autotune(configs, key=real.keys, restore_value=real.restore_value, do_bench=timer)(
            kernel
        )

    row = tuned(interpreted._row_loss_kernel, triton_logits._row_loss_tuned, [(32,), (64,)])
    dlogits = tuned(interpreted._dlogits_kernel, triton_logits._dlogits_tuned, [(8, 32), (16, 64)])
    monkeypatch.setattr(triton_logits, "row_launch", lambda device, vocab_size: (row, {}))
    monkeypatch.setattr(triton_logits, "dlogits_launch", lambda device: (dlogits, {}))
    for weight_grad_pass in ("vocab", "rows"):
        _compare("half", "sum", OPTION_SETS["everything"], weight_grad_pass)
    assert trials and row.cache and dlogits.cache
    assert all(config.kwargs == {"BLOCK_V": 64} for config in row.cache.values())
