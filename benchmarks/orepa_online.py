"""Does OREPA's initialisation close the online ACB's gap? (issue "Cheap ACB", item 2)

OREPA (Hu et al., CVPR 2022; JUGGHM/OREPA_CVPR2022 ``blocks.py``) trains its branches online
(per-branch, per-channel scales, ONE BatchNorm after the sum), like acnet's online ACB
(``branch_bn=False, branch_scale=True``), but starts the scales unequal: 0.25 for the k×k
origin, 0.5 for the branches built around it, 1.0 for the 1×1. acnet starts every scale at 1.
This trains Cifar-quick in the cheap study's recipe (the config of its committed online run,
seed changed) with the scales started OREPA's way (square 0.25, 1×d and d×1 0.5) and compares
the test accuracy of each seed with the study's committed baseline, online and ACNet runs.

    python benchmarks/orepa_online.py --runs runs/orepa --out benchmarks/round4/orepa_online.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import acnet.block as block
from acnet.train import train
from acnet.train.config import TrainConfig

STUDY = Path(__file__).resolve().parents[1] / "docs/results/cheap/runs"
SCALES = {"square": 0.25, "hor": 0.5, "ver": 0.5}


def _orepa_scales() -> None:
    """Every online ACBlock built from now on starts its branch scales at SCALES."""
    add = block._add_branches

    def patched(b, opts, fk):  # type: ignore[no-untyped-def]
        add(b, opts, fk)
        for name, value in SCALES.items():
            p = getattr(b, f"{name}_scale", None)
            if p is not None:
                with torch.no_grad():
                    p.fill_(value)

    block._add_branches = patched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", default="runs/orepa", help="where the runs go (resumed)")
    ap.add_argument("--out", default="benchmarks/round4/orepa_online.json")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    _orepa_scales()
    d = json.loads((STUDY / "cifar_quick-online-s0/config.json").read_text())
    for k in ("in_channels", "num_classes", "input_size", "image_size", "class_names"):
        d.pop(k, None)
    acc: dict[str, dict[int, float]] = {"orepa_online": {}}
    for s in seeds:
        out = Path(args.runs) / f"cifar_quick-orepa-s{s}"
        m = train(TrainConfig.from_dict({**d, "seed": s}), out,
                  resume=(out / "config.json").exists())
        acc["orepa_online"][s] = m["test_acc"] * 100
    for form in ("base", "online", "acb"):
        acc[form] = {s: json.loads((STUDY / f"cifar_quick-{form}-s{s}/metrics.json").read_text()
                                   )["test_acc"] * 100 for s in seeds}
    gains = {f: [acc[f][s] - acc["base"][s] for s in seeds] for f in acc if f != "base"}
    result = {
        "what": "Cifar-quick, Fashion-MNIST, the cheap study's recipe (10 epochs, 3 seeds); "
                "test accuracy (%) of the deployed models; gain over the baseline, same seed",
        "scales": SCALES, "accuracy": acc,
        "gain": {f: {"per_seed": g, "mean": statistics.mean(g),
                     "std": statistics.stdev(g) if len(g) > 1 else 0.0}
                 for f, g in gains.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for f, g in result["gain"].items():
        seeds_txt = ", ".join(f"{x:+.2f}" for x in g["per_seed"])
        print(f"{f}: gain {g['mean']:+.2f} ± {g['std']:.2f} ({seeds_txt})")


if __name__ == "__main__":
    main()
