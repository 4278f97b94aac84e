"""The ACB options, defined once: ACBlock, convert(), TrainConfig and the CLI derive from here."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError, InputTypeError

__all__ = [
    "BRANCH_INITS",
    "FRESH_OPTIONS",
    "PRESERVE_OPTIONS",
    "TRAIN_OPTIONS",
    "ACBOptions",
    "check_convert_options",
    "check_sub_batch",
]

# how the new branches of convert(preserve=True) start: "zero" (they add nothing: the official
# repo's single_init), "small" (random kernels at a small scale, the square kernel reduced by
# their sum: DyRep's way; the eval-mode function is the same either way)
BRANCH_INITS = ("zero", "small")


def _help(text: str, without: str | None = None) -> dict[str, str]:
    """Field metadata: what the option does, and (for a flag on by default) what turning it off
    does, for the CLI's --no- flag."""
    return {"help": text, "without": without or f"without {text}"}


def check_sub_batch(value: Any) -> None:
    """``value`` is None, an int >= 1 (images) or a float in (0, 1] (a fraction of the batch)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputTypeError(f"sub_batch must be None, a number of images (int >= 1) or a "
                             f"fraction of the batch (float in (0, 1]), got {value!r}",
                             params=("sub_batch",))
    if isinstance(value, int) and value < 1:
        raise InputError(f"sub_batch must be >= 1 images, got {value}", params=("sub_batch",))
    if isinstance(value, float) and not (0 < value <= 1 and math.isfinite(value)):
        raise InputError(f"a fractional sub_batch must be in (0, 1], got {value}",
                         params=("sub_batch",))


@dataclass(frozen=True)
class ACBOptions:
    """How an ACBlock is built beyond its conv geometry; validated on construction.

    Attributes:
        horizontal: the 1×d branch.
        vertical: the d×1 branch.
        branch_bn: a BatchNorm per branch; False: one BatchNorm after the summed kernels.
        branch_scale: online ACB: a learnable per-channel scale per branch (needs
            ``branch_bn=False``).
        position: where the 1×d / d×1 kernels sit: ``"center"`` (the skeleton) or ``"corner"``.
        gamma_init: initial BN scale of every branch (or of the branch scales); None: 1.
        sub_batch: the branch BatchNorms take their statistics from the first N images of each
            batch (an int) or that fraction of it (a float in (0, 1]) and the block runs one
            conv over the batch; None: every image (the ACB).
        affine: affine parameters in the BatchNorms.
        eps: BatchNorm eps.
        momentum: BatchNorm momentum (None: cumulative moving average).
    """

    horizontal: bool = field(default=True, metadata=_help("the 1xd branch"))
    vertical: bool = field(default=True, metadata=_help("the dx1 branch"))
    branch_bn: bool = field(default=True, metadata=_help(
        "a BatchNorm per branch", "one BatchNorm after the summed kernels instead of one per "
        "branch"))
    branch_scale: bool = field(default=False, metadata=_help(
        "online ACB: a learnable per-channel scale per branch (needs branch_bn=False, "
        "--no-branch-bn on the command line)"))
    position: str = field(default="center", metadata=_help(
        "where the 1xd / dx1 kernels sit: 'center' (the skeleton) or 'corner'"))
    gamma_init: float | None = field(default=None, metadata=_help(
        "initial BN scale of every branch (or of the branch scales); None: 1"))
    sub_batch: int | float | None = field(default=None, metadata=_help(
        "sub-batch ACB: the branch BatchNorms take their statistics from the first N images of "
        "each batch (an int), or from that fraction of it (a float in (0, 1]), and the block "
        "runs one conv over the batch; None: every image (the ACB)"))
    affine: bool = field(default=True, metadata=_help("affine parameters in the BatchNorms"))
    eps: float = field(default=1e-5, metadata=_help("BatchNorm eps"))
    momentum: float | None = field(default=0.1, metadata=_help("BatchNorm momentum"))

    def __post_init__(self) -> None:
        for name in ("horizontal", "vertical", "branch_bn", "branch_scale", "affine"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise InputTypeError(f"{name} must be a bool, got {value!r}")
        if self.position not in ("center", "corner"):
            raise InputError(f"position must be 'center' or 'corner', got {self.position!r}")
        if self.branch_scale and self.branch_bn:
            raise InputError("branch_scale=True needs branch_bn=False (the scales replace the "
                             "branch BatchNorms), got branch_bn=True")
        check_sub_batch(self.sub_batch)
        if self.sub_batch is not None and not self.branch_bn:
            raise InputError(f"sub_batch={self.sub_batch!r} sets where the branch BatchNorms "
                             f"take their statistics: it needs branch_bn=True",
                             params=("sub_batch", "branch_bn"))
        g = self.gamma_init
        if g is not None:
            if isinstance(g, bool) or not isinstance(g, (int, float)):
                raise InputTypeError(f"gamma_init must be a float or None, got {g!r}")
            if not math.isfinite(g):
                raise InputError(f"gamma_init must be finite, got {g}")
            if not self.affine and not self.branch_scale:
                raise InputError("gamma_init needs affine=True (a BN without affine has no "
                                 "scale)")
        eps = self.eps
        if (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0
                or not math.isfinite(eps)):
            raise InputError(f"eps must be a positive float, got {eps!r}")
        m = self.momentum
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float))
                              or not 0 <= m <= 1):
            raise InputError(f"momentum must be None or in [0, 1], got {m!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every option name, in definition order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def kwargs(self, names: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The options as ACBlock keyword arguments (all, or those in ``names``)."""
        return {n: getattr(self, n) for n in (names or self.names())}


# what convert(preserve=True) may set: the weights come from the model, so the BN settings
# (gamma_init, affine, eps, momentum) are the absorbed BN's own
PRESERVE_OPTIONS = ("horizontal", "vertical", "branch_bn", "branch_scale", "position",
                    "sub_batch")
FRESH_OPTIONS = ACBOptions.names()
# the options a training run sets (TrainConfig fields of the same names; the CLI's ablation)
TRAIN_OPTIONS = (*PRESERVE_OPTIONS, "gamma_init")


def check_convert_options(preserve: bool, options: dict[str, Any]) -> ACBOptions:
    """Validate convert()'s ``**acb_options``: known names for the mode, valid values."""
    allowed = PRESERVE_OPTIONS if preserve else FRESH_OPTIONS
    bad = set(options) - set(allowed)
    if bad:
        hint = " (only with preserve=False)" if bad <= set(FRESH_OPTIONS) else ""
        raise InputTypeError(f"convert() got unsupported ACBlock option(s) {sorted(bad)}{hint}; "
                        f"allowed: {sorted(allowed)}")
    return ACBOptions(**options)
