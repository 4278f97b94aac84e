"""`acnet bench`: the online and torch.compile'd variants, several batch sizes, bad input."""

from __future__ import annotations

import pytest
import torch


def test_bench_compiled_and_online_variants_at_two_batches(monkeypatch):
    """--compile adds compiled base/ACB/online rows with their compile time (Dynamo's eager
    backend here, to stay fast); every batch gets training rows, inference also batch 1."""
    from acnet.bench import format_table, run_bench

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, backend="eager", **kw))
    res = run_bench(models=("cifar_quick",), repeats=1, warmup=0, batch=(4, 8),
                    conversion=False, compile=True)
    assert [r["batch"] for r in res["training"]] == [4, 8]
    tr = res["training"][0]
    assert set(tr["ratio"]) == {"base", "acb", "acb_no_branch_bn", "acb_online", "acb_sub4",
                                "acb_sub8", "straightforward_acb", "base_compiled",
                                "acb_compiled", "acb_online_compiled", "acb_sub4_compiled"}
    assert tr["ratio"]["base"] == 1.0 and all(v > 0 for v in tr["ms"].values())
    assert set(tr["compile_s"]) == {"base_compiled", "acb_compiled", "acb_online_compiled",
                                    "acb_sub4_compiled"}
    assert len(tr["load_avg"]) == 2
    assert [r["batch"] for r in res["inference"]] == [1, 4, 8]
    inf = res["inference"][0]
    assert inf["unfused_vs_deployed"] == pytest.approx(
        inf["ms"]["acnet_unfused"] / inf["ms"]["acnet_deployed"])
    assert "online_unfused" in inf["ratio"]
    table = format_table(res)
    assert "under torch.compile" in table and "online ACB" in table
    assert "unfused / deployed" in table
    assert res["ops_per_block"]["cpu"]["base"] == {"train": 5, "eval": 2}
    assert "training forward + backward" in table


@pytest.mark.parametrize("batch", ["0", "64,x", ""])
def test_bench_rejects_bad_batch_lists(capsys, batch):
    from acnet.cli import main

    assert main(["bench", "--models", "cifar_quick", "--batch", batch]) == 2
    err = capsys.readouterr().err
    assert "--batch must be comma-separated positive integers" in err and "Traceback" not in err


@pytest.mark.parametrize("channels_last", [True, False])
def test_bench_training_in_the_studys_format(channels_last):
    """The study's cost section times 1-channel 28x28 batches in the format training uses."""
    from acnet.bench import bench_training

    r = bench_training("cifar_quick", torch.device("cpu"), 4, 1, 0, image=28, in_channels=1,
                       channels_last=channels_last)
    assert r["channels_last"] is channels_last and r["ratio"]["base"] == 1.0
    assert all(v > 0 for v in r["ms"].values())


def test_ops_per_block_stay_few():
    """The compute ops each form dispatches per block (what an eager GPU launches): the unfused
    eval fold from one stack of the branch statistics and no layout copy, the sub-batch form's
    statistics in few ops. Bounds at this version's counts: more ops is a regression."""
    from acnet.bench import ops_per_block

    ops = ops_per_block()
    assert ops["base"] == {"train": 5, "eval": 2}  # conv, BN, their backwards, the BN counter
    assert ops["acb"]["eval"] <= 12 and ops["acb_online"]["eval"] <= 11
    assert ops["acb"]["train"] <= 19 and ops["acb_sub4"]["train"] <= 73
    assert ops["acb_sub4"]["eval"] == ops["acb"]["eval"]


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("cin", [1, 3])
def test_merged_kernel_is_built_in_the_kernels_layout(fmt, cin):
    """merge_kernels gives the square kernel's strides without a copy in both layouts (also
    with one input channel, where the shape cannot tell the layout), and the same values."""
    from acnet.analysis.cost import count_kernels
    from acnet.fusion import merge_kernels, tap_indices

    torch.manual_seed(0)
    ws = [torch.randn(4, cin, *s).contiguous(memory_format=fmt) for s in ((3, 3), (1, 3), (3, 1))]
    scales = [torch.rand(4) for _ in ws]
    taps = tap_indices(3, [(1, 3, 1, 0), (3, 1, 0, 1)])
    out: list[torch.Tensor] = []
    ops = count_kernels(lambda: out.append(merge_kernels(ws, taps, scales)))
    assert "copy_" not in ops and "clone" not in ops
    assert out[0].stride() == ws[0].stride()
    ref = ws[0] * scales[0].view(-1, 1, 1, 1)
    ref[:, :, 1:2, :] += ws[1] * scales[1].view(-1, 1, 1, 1)
    ref[:, :, :, 1:2] += ws[2] * scales[2].view(-1, 1, 1, 1)
    torch.testing.assert_close(out[0], ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--device", "tpu"], "device must be cpu, cuda or cuda:N, got 'tpu' (set by --device)"),
    (["--models", "resnet21"], "unknown model 'resnet21'"),
    (["--models", ","], "models is empty"),
])
def test_bench_bad_input_is_one_line(capsys, args, message):
    from acnet.cli import main

    assert main(["bench", *args, "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_bench_on_cuda_without_one_is_one_line(capsys):
    from acnet.cli import main

    assert main(["bench", "--device", "cuda", "--repeats", "1"]) == 2
    assert "no CUDA device is available (set by --device)" in capsys.readouterr().err
