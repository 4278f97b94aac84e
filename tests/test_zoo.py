"""The whole torchvision classification zoo: convert == original, deploy == trained, stock loads.

A representative set runs by default; every builder runs with ``-m slow``.
"""

from __future__ import annotations

import pytest

torchvision = pytest.importorskip("torchvision")
from zoo import round_trip  # noqa: E402

FAST = ["resnet18", "alexnet", "densenet121", "squeezenet1_1", "googlenet", "inception_v3",
        "mobilenet_v3_small", "shufflenet_v2_x0_5", "regnet_y_400mf", "efficientnet_b0",
        "mnasnet0_5", "convnext_tiny", "vgg11_bn", "resnext50_32x4d"]
ALL = torchvision.models.list_models(module=torchvision.models)
# models without any eligible conv (transformers with a patchify stem): convert is a no-op
NOTHING_TO_CONVERT = ("vit_", "swin_")


def _check(name: str) -> None:
    r = round_trip(name)
    if name.startswith(NOTHING_TO_CONVERT):
        assert r["converted"] == 0
    else:
        assert r["converted"] > 0
    assert r["spread"] > 1e-3, r  # outputs are not degenerate (constant or saturated)
    # float64, both models: convert copies weights exactly; only a conv bias folded into the BN's
    # running mean is rounded to float32 once per layer (vgg*_bn), which does not compound
    assert r["err_convert"] <= 1e-6, r
    # float64, BN statistics from data: exact fusion leaves only rounding (measured <= 3e-14)
    assert r["err_deploy"] <= 1e-9, r
    if r["bias_added"]:
        assert name.startswith("densenet"), r  # pre-activation: convs with neither bias nor BN
    else:
        assert r["params_equal"] and r["err_stock"] <= 1e-9, r


@pytest.mark.parametrize("name", FAST)
def test_zoo_fast(name):
    _check(name)


# RegNetY-128GF (644M parameters) needs more than this project's 24 GiB in float64
TOO_BIG = {"regnet_y_128gf"}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", [n for n in ALL if n not in FAST])
def test_zoo_all(name):
    if name in TOO_BIG:
        pytest.skip(f"{name} needs more than 24 GiB of memory in float64")
    _check(name)


def test_fast_list_is_in_the_zoo():
    assert set(FAST) <= set(ALL)
