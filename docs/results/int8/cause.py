"""Why a deployed model quantizes worse: per layer of the BN-folded model, weight ranges per
output channel and activation ranges per channel (onnxruntime quantizes activations per
tensor, weights per channel). Prints a markdown table, writes OUT.json.

    OMP_NUM_THREADS=1 .venv/bin/python docs/results/int8/cause.py docs/results/int8/cause.json \
        runs/int8/cq-*-s*
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from acnet import deploy
from acnet.quantize import sample_calibration_images
from acnet.runs import load_deployed_model, open_run
from acnet.train.data import in_memory_data, test_split


def _int8_err(w: torch.Tensor, peak: torch.Tensor) -> float:
    q = (w / (peak / 127)).round().clamp(-127, 127) * (peak / 127)
    return ((q - w).norm() / w.norm()).item()


def weight_rows(folded: nn.Module) -> list[dict]:
    rows = []
    for name, m in folded.named_modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight.detach().double().flatten(1)
            peak = w.abs().amax(1, keepdim=True)
            k = m.weight.shape[-1]
            centre = m.weight.detach().abs()[:, :, k // 2, k // 2].sum() / m.weight.abs().sum()
            rows.append({"layer": name, "peak_over_rms": (peak[:, 0] / w.pow(2).mean(1).sqrt())
                         .mean().item(), "centre_share": centre.item(),
                         "err_per_channel": _int8_err(w, peak),
                         "err_per_tensor": _int8_err(w, peak.max())})
    return rows


@torch.no_grad()
def activation_rows(folded: nn.Module, images: torch.Tensor) -> list[dict]:
    """Per ReLU output: max / 99.99th percentile (outliers) and max over median of the
    per-channel maxima (how unevenly the channels share one per-tensor INT8 range)."""
    rows = []

    def hook(module, _inp, out):
        ch = out.transpose(0, 1).flatten(1).float()
        a = ch.flatten()
        p = torch.quantile(a[torch.randperm(a.numel())[:2_000_000]], 0.9999)
        cmax = ch.amax(1)
        rows.append({"layer": names[module], "max_over_p9999": (a.max() / p).item(),
                     "channel_max_over_median": (cmax.max() / cmax.median().clamp_min(1e-12))
                     .item(), "max": a.max().item()})

    names = {m: n for n, m in folded.named_modules() if isinstance(m, nn.ReLU)}
    hooks = [m.register_forward_hook(hook) for m in names]
    folded(images)
    for h in hooks:
        h.remove()
    return rows


def logit_noise(run: str, data, images: torch.Tensor) -> dict:
    """INT8 (MinMax, per channel, 512 images) against fp32 logits on the test set: relative
    L2 error (a continuous, less seed-noisy measure than accuracy) and the fp32 top-1 margin."""
    import onnxruntime as ort

    from acnet.export import export_onnx
    from acnet.quantize import quantize_onnx

    cfg, _ = open_run(run)
    x = test_split(cfg, data=data).loader
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "m.onnx"
        export_onnx(load_deployed_model(run), fp32, (1, *images.shape[1:]))
        int8 = quantize_onnx(fp32, Path(tmp) / "q.onnx", images, method="minmax")
        outs = []
        for path in (fp32, int8):
            s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            outs.append(np.concatenate([s.run(None, {s.get_inputs()[0].name: b.numpy()})[0]
                                        for b, _ in x]))
    ref, got = outs
    top2 = np.sort(ref, 1)[:, -2:]
    return {"logit_rel_err": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
            "median_margin": float(np.median(top2[:, 1] - top2[:, 0])),
            "logit_rms": float(np.sqrt((ref ** 2).mean()))}


def main(out: str, runs: list[str]) -> None:
    results = {}
    for run in runs:
        cfg, _ = open_run(run)
        folded = deploy(load_deployed_model(run), fold_bn=True).eval()
        data = in_memory_data(cfg)
        images = sample_calibration_images(data, 512)
        kind = "online" if cfg.branch_scale else cfg.block
        results[Path(run).name] = {"model": cfg.model, "block": kind,
                                   "weights": weight_rows(folded),
                                   "activations": activation_rows(folded, images),
                                   "logits": [logit_noise(run, data, images)]}
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    table = defaultdict(lambda: defaultdict(list))
    for r in results.values():
        for part in ("weights", "activations", "logits"):
            for row in r[part]:
                for k, v in row.items():
                    if k != "layer":
                        table[(r["model"], r["block"], part, row.get("layer", "output"))][k] \
                            .append(v)
    print("| model | block | tensor | layer | statistic: mean over runs |\n|---|---|---|---|---|")
    for (model, block, part, layer), stats in sorted(table.items()):
        cells = ", ".join(f"{k} {statistics.mean(v):.3g}" + (
            f" ± {statistics.stdev(v):.2g}" if len(v) > 1 else "") for k, v in stats.items())
        print(f"| {model} | {block} | {part} | {layer} | {cells} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
