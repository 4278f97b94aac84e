"""fp32 vs INT8 (onnxruntime static quantization) of the runs under RUNS, with the weight and
activation statistics that explain the gap. Writes RUN/int8_study.json per run and OUT.json.

    OMP_NUM_THREADS=1 .venv/bin/python docs/results/int8/measure.py runs/int8 \
        docs/results/int8/results.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from acnet import deploy
from acnet.export import export_onnx
from acnet.quantize import evaluate_onnx, quantize_onnx, sample_calibration_images
from acnet.runs import load_deployed_model, open_run
from acnet.train.data import in_memory_data, test_split

# (method, per_channel, calibration images)
# (entropy: ~1.5 s per tensor to search its threshold, so only Cifar-quick's seed 0)
SETTINGS = [("minmax", True, 512), ("minmax", False, 512), ("percentile", True, 512),
            ("percentile", False, 512), ("entropy", True, 512), ("minmax", True, 128),
            ("minmax", True, 2048)]


def wanted(method: str, cfg) -> bool:
    return method != "entropy" or (cfg.seed == 0 and cfg.model == "cifar_quick")


def weight_stats(model: nn.Module) -> dict[str, float]:
    """Per output channel of every BN-folded conv: peak/rms of the kernel (how much of the
    INT8 grid the bulk of the weights gets) and the relative INT8 rounding error."""
    peak_rms, spread, err_pc, err_pt = [], [], [], []
    for m in deploy(model, fold_bn=True).modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight.detach().double().flatten(1)
            peak = w.abs().amax(1, keepdim=True)
            peak_rms.append((peak[:, 0] / w.pow(2).mean(1).sqrt()).mean().item())
            spread.append((peak.max() / peak.median()).item())
            q_pc = (w / (peak / 127)).round().clamp(-127, 127) * (peak / 127)
            q_pt = (w / (peak.max() / 127)).round().clamp(-127, 127) * (peak.max() / 127)
            err_pc.append(((q_pc - w).norm() / w.norm()).item())
            err_pt.append(((q_pt - w).norm() / w.norm()).item())
    return {"peak_over_rms": peak_rms, "channel_peak_max_over_median": spread,
            "weight_int8_rel_err_per_channel": err_pc, "weight_int8_rel_err_per_tensor": err_pt}


@torch.no_grad()
def activation_stats(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Per ReLU output (what INT8 quantizes after each conv): max / 99.99th percentile, the
    share of the MinMax range that the outliers waste."""
    ratios = []

    def hook(_m, _i, out):
        a = out.flatten().float()
        q = torch.quantile(a[torch.randperm(a.numel())[:2_000_000]], 0.9999)
        ratios.append((a.max() / q.clamp_min(1e-12)).item())

    folded = deploy(model, fold_bn=True).eval()
    hooks = [m.register_forward_hook(hook) for m in folded.modules() if isinstance(m, nn.ReLU)]
    folded(images)
    for h in hooks:
        h.remove()
    return {"act_max_over_p9999": ratios}


def study(run: Path) -> dict:
    cfg, _ = open_run(run)
    data = in_memory_data(cfg)
    test = test_split(cfg, data=data).loader
    model = load_deployed_model(run)
    kind = "online" if cfg.branch_scale else cfg.block
    out = {"run": run.name, "model": cfg.model, "block": kind, "seed": cfg.seed,
           "test_images": len(data.test_y), **weight_stats(model),
           **activation_stats(model, sample_calibration_images(data, 512, 0)), "int8": []}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "m.onnx"
        export_onnx(model, fp32, (1, *data.shape))
        ref = evaluate_onnx(fp32, test)
        out["onnx_test_acc"] = ref.accuracy
        for method, pc, n in SETTINGS:
            if not wanted(method, cfg):
                continue
            t0 = time.perf_counter()
            q = quantize_onnx(fp32, Path(tmp) / "q.onnx", sample_calibration_images(data, n),
                              method=method, per_channel=pc)
            got = evaluate_onnx(q, test)
            out["int8"].append({"method": method, "per_channel": pc, "calibration_images": n,
                                "int8_test_acc": got.accuracy,
                                "int8_agreement": float((got.predictions
                                                         == ref.predictions).mean()),
                                "seconds": time.perf_counter() - t0})
            print(run.name, method, pc, n, ref.accuracy, got.accuracy, flush=True)
        if cfg.model == "cifar_quick" and cfg.seed == 0:
            out["float_layer"] = sensitivity(fp32, Path(tmp), data, test)
    return out


def sensitivity(fp32: Path, tmp: Path, data, test) -> dict[str, float]:
    """INT8 accuracy (MinMax, per channel, 512 images) with one Conv/Gemm node left in float."""
    import onnx

    names = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type in ("Conv", "Gemm")]
    calib = sample_calibration_images(data, 512)
    return {name: evaluate_onnx(quantize_onnx(fp32, tmp / "s.onnx", calib, method="minmax",
                                              nodes_to_exclude=[name]), test).accuracy
            for name in names}


def main(runs: str, out: str) -> None:
    results = []
    for run in sorted(Path(runs).iterdir()):
        if not (run / "metrics.json").is_file():
            continue
        cache = run / "int8_study.json"
        if not cache.is_file():
            cache.write_text(json.dumps(study(run), indent=2))
        results.append(json.loads(cache.read_text()))
    Path(out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
