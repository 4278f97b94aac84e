"""The sub-batch training form (``sub_batch``): the branch BatchNorms take their statistics, with
their gradient, from the first M images; the block runs one conv over the batch. Checked against
the definition in float64 on every geometry, for running statistics, the dispatch to the ACB,
eval/deploy, options, the CLI, resume, compile and the cheap study."""

from __future__ import annotations

import copy
import json
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn
from torch import nn

import acnet
from acnet import ACBlock
from acnet.errors import InputError, InputTypeError
from test_train_cli import SMALL, _state, _wait_for, cli

GEOMETRIES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, padding="same", dilation=2),
    dict(kernel_size=3, padding=1, groups=2, padding_mode="reflect"),
    dict(kernel_size=3, padding=1, groups=4),  # depthwise (4 -> 4 channels below)
    dict(kernel_size=4, padding=(1, 2)),
    dict(kernel_size=2, padding="valid"),
    dict(kernel_size=5, padding=2, padding_mode="circular", position="corner"),
    dict(kernel_size=3, padding=1, horizontal=False),
    dict(kernel_size=3, padding=(0, 1), vertical=False, affine=False),
]


def _block(geometry: dict, sub_batch, seed: int = 0) -> ACBlock:
    torch.manual_seed(seed)
    g = dict(geometry)
    cout = 4 if g.get("groups") == 4 else 6
    blk = ACBlock(4, cout, g.pop("kernel_size"), sub_batch=sub_batch, **g).double()
    return randomize_bn(blk, seed)


def _definition(block: ACBlock, x: torch.Tensor, m: int) -> torch.Tensor:
    """Σ_b γ_b (conv_b(x) − μ_b) / sqrt(σ²_b + eps) + β_b, the statistics from the first m images
    (each branch run alone at the square conv's output size)."""
    out = 0
    for b in block.branches():
        z = block.branch_output(x, b.conv.weight, b.row, b.col)
        var, mean = torch.var_mean(z[:m], dim=(0, 2, 3), unbiased=False)
        y = (z - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + b.norm.eps)
        if b.norm.affine:
            y = y * b.norm.weight.view(1, -1, 1, 1) + b.norm.bias.view(1, -1, 1, 1)
        out = out + y
    return out


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_sub_batch_is_its_definition_forward_backward_and_running_stats(geometry):
    m = 3
    blk = _block(geometry, m)
    ref = copy.deepcopy(blk)
    stats0 = [(n.running_mean.clone(), n.running_var.clone()) for n in ref.batch_norms()]
    x = torch.randn(8, 4, 9, 11, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = blk(x), _definition(ref, x_ref, m)
    assert y.shape == y_ref.shape == ref.fuse().double()(x_ref).shape
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    for (name, p), q in zip(blk.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=name)
    # running statistics: what a BatchNorm2d computes on each branch's sub-batch output
    for n_blk, b, (mean0, var0) in zip(blk.batch_norms(), ref.branches(), stats0, strict=True):
        z = ref.branch_output(x_ref.detach()[:m], b.conv.weight.detach(), b.row, b.col)
        rm, rv = mean0.clone(), var0.clone()
        F.batch_norm(z, rm, rv, training=True, momentum=b.norm.momentum, eps=b.norm.eps)
        torch.testing.assert_close(n_blk.running_mean, rm, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(n_blk.running_var, rv, rtol=1e-12, atol=1e-12)
        assert int(n_blk.num_batches_tracked) == 1


def test_fraction_cumulative_momentum_and_short_batches():
    geometry = dict(kernel_size=3, padding=1)
    blk = _block(geometry, 0.25)
    for n in blk.batch_norms():
        n.momentum = None  # cumulative average, as BatchNorm2d with momentum=None
    ref = copy.deepcopy(blk)
    x = torch.randn(8, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(blk(x), _definition(ref, x, 2))  # a quarter of 8 images
    blk(x)
    for n in blk.batch_norms():
        assert int(n.num_batches_tracked) == 2
    # a batch the sub-batch covers (the short last batch of an epoch) trains the ACB itself
    full = _block(geometry, 8)
    plain = _block(geometry, None)
    x = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    assert torch.equal(full(x), plain(x))
    for a, b in zip(full.batch_norms(), plain.batch_norms(), strict=True):
        assert torch.equal(a.running_var, b.running_var)


def test_too_few_values_per_channel_is_an_input_error():
    blk = ACBlock(2, 2, 3, sub_batch=1).double()  # one image, one output position
    with pytest.raises(InputError, match="more than 1 value per channel"):
        blk(torch.randn(4, 2, 3, 3, dtype=torch.float64))


def test_norms_in_their_own_mode_and_eval_are_exact():
    geometry = dict(kernel_size=3, padding=1)
    blk, plain = _block(geometry, 2), _block(geometry, None)
    blk.hor_bn.eval()
    plain.hor_bn.eval()
    x = torch.randn(6, 4, 7, 7, dtype=torch.float64)
    assert torch.equal(blk(x), plain(x))  # a norm on running statistics: the full branch sum
    blk.train()
    for _ in range(3):  # running statistics from sub-batches
        blk(torch.randn(6, 4, 7, 7, dtype=torch.float64))
    blk.eval()
    torch.testing.assert_close(blk(x), blk.fuse()(x), rtol=1e-10, atol=1e-10)
    blk.reparameterize()
    assert blk.is_fused


def test_options_are_validated():
    for bad in (0, -3):
        with pytest.raises(InputError, match="sub_batch must be >= 1"):
            ACBlock(2, 2, 3, sub_batch=bad)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(InputError, match="fractional sub_batch"):
            ACBlock(2, 2, 3, sub_batch=bad)
    for bad in (True, "8", [4]):
        with pytest.raises(InputTypeError, match="sub_batch must be None"):
            ACBlock(2, 2, 3, sub_batch=bad)
    with pytest.raises(InputError, match="needs branch_bn=True"):
        ACBlock(2, 2, 3, branch_bn=False, sub_batch=4)
    with pytest.raises(InputError, match="needs branch_bn=True"):
        acnet.ACBOptions(branch_bn=False, branch_scale=True, sub_batch=0.5)


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


@pytest.mark.parametrize("preserve", [True, False])
def test_convert_trains_and_deploys_to_the_stock_model(preserve):
    torch.manual_seed(0)
    base = _tiny_net()
    model = acnet.convert(base, preserve=preserve, sub_batch=4)
    blocks = [m for m in model.modules() if isinstance(m, ACBlock)]
    assert len(blocks) == 2 and all(b.sub_batch == 4 for b in blocks)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(3):
        loss = F.cross_entropy(model(torch.randn(16, 3, 8, 8)), torch.randint(0, 3, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    deployed = acnet.deploy(model)
    stock = _tiny_net()
    stock.load_state_dict(deployed.state_dict())
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(stock.eval()(x), model(x), rtol=1e-4, atol=1e-5)
    # copies, pickles and TorchScript keep working (scripted blocks train the full ACB)
    again = pickle.loads(pickle.dumps(model))
    assert [b.sub_batch for b in again.modules() if isinstance(b, ACBlock)] == [4, 4]
    assert "sub_batch=4" in repr(blocks[0])
    scripted = torch.jit.script(copy.deepcopy(model))
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)


def test_frozen_norms_take_the_online_form_and_ignore_sub_batch():
    torchvision = pytest.importorskip("torchvision")
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    net = nn.Sequential(conv, torchvision.ops.FrozenBatchNorm2d(4))
    out = acnet.convert(net, sub_batch=0.5)
    blk = out[0]
    assert isinstance(blk, ACBlock) and blk.branch_scale and blk.sub_batch is None


def test_autocast_and_channels_last():
    torch.manual_seed(0)
    blk = ACBlock(4, 8, 3, padding=1, sub_batch=0.5)
    ref = copy.deepcopy(blk)
    x = torch.randn(8, 4, 10, 10).contiguous(memory_format=torch.channels_last)
    blk = blk.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = blk(x)
    want = _definition(ref, x, 4)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), want, rtol=0.05, atol=0.1)
    for n in blk.batch_norms():
        assert n.running_var.dtype == torch.float32 and torch.isfinite(n.running_var).all()


def test_compile_matches_eager():
    torch.manual_seed(0)
    blk = ACBlock(3, 6, 3, padding=1, sub_batch=0.25)
    twin = copy.deepcopy(blk)
    compiled = torch.compile(twin, dynamic=False)
    x = torch.randn(8, 3, 8, 8)
    y, yc = blk(x), compiled(x)
    torch.testing.assert_close(yc, y, rtol=1e-4, atol=1e-5)
    y.sum().backward()
    yc.sum().backward()
    torch.testing.assert_close(twin.hor_conv.weight.grad, blk.hor_conv.weight.grad, rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(twin.hor_bn.running_var, blk.hor_bn.running_var)


def test_cli_trains_resumes_bit_exact_and_refuses_bad_values(tmp_path):
    args = [*SMALL, "--epochs", 3, "--train-limit", 512, "--test-limit", 64, "--sub-batch", 8]
    ref = tmp_path / "ref"
    cli("train", *args, "--out", ref)
    cfg = json.loads((ref / "config.json").read_text())
    assert cfg["sub_batch"] == 8
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "acnet", "train", *map(str, args), "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: (run / "metrics.jsonl").exists() or proc.poll() is not None)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cli("train", *args, "--out", run, "--resume")
    a, b = _state(ref), _state(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    m = json.loads((ref / "metrics.json").read_text())
    assert m["max_abs_diff_deploy"] < 1e-4
    for flags, words in ((["--sub-batch", "0"], "sub_batch must be >= 1"),
                         (["--sub-batch", "x"], "expected a number of images"),
                         (["--sub-batch", "4", "--no-branch-bn"], "needs branch_bn=True"),
                         (["--sub-batch", "4", "--sync-bn"], "do not combine"),
                         (["--sub-batch", "4", "--block", "base"], "need block='acb'")):
        proc = cli("train", *SMALL, *flags, "--out", tmp_path / "bad", check=False)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], proc.stderr


def test_cheap_study_end_to_end(tmp_path):
    """Costs measured once and kept; every form at equal epochs and at equal compute; the report
    answers first and names the compute each equal-compute run used."""
    from acnet.experiments import cheap

    study = cheap.CheapStudy(dataset="synthetic", epochs={"cifar_quick": 2}, seeds=(0, 1),
                             train_limit=256, test_limit=128, batch_size=32, bench_repeats=1,
                             bench_warmup=0)
    (tmp_path / cheap.COST_BENCH).write_text(json.dumps({"ratios": {"cifar_quick": {
        "base": 1.0, "acb": 1.9, "sub4": 1.3, "sub8": 1.1, "online": 1.05}}}))
    path = cheap.run(tmp_path, study=study, command="acnet reproduce --preset cheap")
    text = path.read_text()
    assert text.splitlines()[3].startswith("**In short:** cifar_quick: ACNet ")
    data = json.loads((tmp_path / cheap.RESULTS).read_text())
    assert data["pending"] == []
    # 5 forms at 2 epochs; ACNet at round(2 / 1.9) = 1 epoch, sub4 at round(2 / 1.3) = 2 (the
    # same runs), sub8 and online at 2
    assert sorted(data["runs"]) == sorted([f"cifar_quick/{f}/e2" for f in cheap.FORMS]
                                          + ["cifar_quick/acb/e1"])
    assert all(len(v) == 2 for v in data["runs"].values())
    assert "| ACNet | 1 | 0.95 |" in text and "| sub-batch 1/4 | 2 | 1.30 |" in text
    assert (tmp_path / cheap.FIGURE).is_file() and "nan" not in text
    sub = json.loads((tmp_path / "runs" / "cifar_quick-sub4-s0" / "config.json").read_text())
    assert sub["sub_batch"] == 0.25 and sub["block"] == "acb"
    # a rerun trains nothing and keeps the measured costs
    assert cheap.run(tmp_path, study=study).read_text().count("runs finished") == 1
    assert json.loads((tmp_path / cheap.COST_BENCH).read_text())["ratios"]["cifar_quick"][
        "acb"] == 1.9


def test_cheap_study_measures_costs_with_the_runs_threads(tmp_path):
    from acnet.experiments import cheap

    study = cheap.CheapStudy(epochs={"cifar_quick": 2}, batch_size=8, bench_repeats=1,
                             bench_warmup=0)
    costs = cheap.measure_costs(study, tmp_path, threads=1)
    assert set(costs["cifar_quick"]) == set(cheap.FORMS) and costs["cifar_quick"]["base"] == 1.0
    saved = json.loads((tmp_path / cheap.COST_BENCH).read_text())
    assert saved["threads"] == 1 and saved["ratios"] == costs


def test_cheap_report_gives_no_share_of_a_gain_within_noise(tmp_path, monkeypatch):
    """Where ACNet's own gain is within seed noise (vgg16_quarter in the committed study) a
    cheaper form's 'share' of it is meaningless (it read −940 %): none is given, the report says
    why, the answer names the best form at equal compute without one, and a single seed's
    accuracy is marked as one seed rather than '± 0.00'."""
    from acnet.experiments import cheap

    study = cheap.CheapStudy(epochs={"m": 4}, seeds=(0, 1, 2))
    accs = {("base", 4): (0.920, 0.925, 0.918), ("acb", 4): (0.922, 0.921, 0.921),
            ("sub4", 4): (0.915, 0.920, 0.917), ("sub8", 4): (0.910, 0.915, 0.912),
            ("online", 4): (0.921, 0.924, 0.919), ("acb", 2): (0.90, 0.91, 0.905),
            ("sub4", 3): (0.912, 0.914, 0.913), ("sub8", 3): (0.916,)}

    def runs(form, e, xs):
        return [cheap.RunResult(f"m-{form}-e{e}-s{s}", s, e, a, 0.0, 1.0, 1.0)
                for s, a in enumerate(xs)]

    costs = {"m": {"base": 1.0, "acb": 2.0, "sub4": 1.5, "sub8": 1.3, "online": 1.0}}
    res = cheap.CheapResults(study, costs, {("m", f, e): runs(f, e, xs)
                                            for (f, e), xs in accs.items()}, [], "cmd")
    assert res.gain("m", "acb").verdict == "no"
    assert all(res.share("m", f) is None for f in ("sub4", "sub8", "online"))
    table = "\n".join(cheap._epochs_table(res, "m"))
    assert " %" not in table.split("\n\n")[0]
    assert "no share of it is given" in table
    assert "91.60 (one seed)" in "\n".join(cheap._compute_table(res, "m"))
    answer = cheap._answer_cheap(res)
    assert "no cheaper form beats it beyond seed noise (closest: online at 1.00x the step; " \
        in answer
    assert "% of" not in answer
    # a gain beyond noise keeps the share
    res.runs[("m", "acb", 4)] = runs("acb", 4, (0.930, 0.934, 0.929))
    assert res.gain("m", "acb").verdict == "yes, better"
    assert res.share("m", "online") == pytest.approx(
        (0.9213333 - 0.921) / (0.931 - 0.921), rel=1e-3)
    # the gain-against-cost figure colours each form as every other figure does
    from acnet.analysis import plots

    seen = {}
    monkeypatch.setattr(plots, "gain_panels",
                        lambda panels, path, **kw: seen.update(kw.get("colours") or {}))
    cheap._figures(res, tmp_path)
    assert seen == {cheap.SHORT_LABELS[f]: plots.VARIANT_COLOURS[f] for f in cheap.FORMS}


def test_cheap_results_name_the_machine_that_measured_the_costs(tmp_path):
    """A report-only rewrite on another machine keeps the machine of cost_bench.json (the one
    whose step costs the report quotes) in results.json."""
    from acnet._env import machine
    from acnet.experiments import cheap

    assert cheap._bench_machine(tmp_path) == machine()  # no costs measured: this machine
    (tmp_path / cheap.COST_BENCH).write_text(json.dumps({"machine": {"cpu": "the other one"}}))
    assert cheap._bench_machine(tmp_path) == {"cpu": "the other one"}
    (tmp_path / cheap.COST_BENCH).write_text("{not json")
    assert cheap._bench_machine(tmp_path) == machine()
