"""ACBlock: a square conv-BN strengthened by 1×d and d×1 branches, fusable into one conv."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, cast

import torch
from torch import Tensor, nn

from . import norms
from ._sub_batch import sub_batch_weights
from .alignment import branch_conv, input_pads
from .errors import InputError, InputTypeError
from .fusion import branch_offsets, merge_kernels, tap_indices
from .options import ACBOptions

__all__ = ["ACBlock", "Branch", "Origin"]

PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]


class BranchKind(NamedTuple):
    """A kind of branch: its name (children ``NAME_conv``, ``NAME_bn``, parameter
    ``NAME_scale``), the ACBlock option that adds it (None: always there) and its kernel:
    "square" (d×d), "row" (1×d on the 1×d row of the window) or "col" (d×1 on its column)."""

    name: str
    option: str | None
    kernel: str


# The branch table, in state_dict order (the official repo's): every loop over branches reads it.
# TorchScript cannot loop over attribute names, so ``_kernels`` and ``_branch_sum`` spell them
# out; tests/test_block.py pins them to this table.
BRANCHES = (BranchKind("square", None, "square"), BranchKind("hor", "horizontal", "row"),
            BranchKind("ver", "vertical", "col"))
_CHILDREN = (*(f"{k.name}_{c}" for k in BRANCHES for c in ("conv", "bn")), "bn")
_SCALES = tuple(f"{k.name}_scale" for k in BRANCHES)


def _shape(kind: BranchKind, d: int) -> tuple[int, int]:
    return {"square": (d, d), "row": (1, d), "col": (d, 1)}[kind.kernel]


def _place(kind: BranchKind, offsets: tuple[int, int]) -> tuple[int, int]:
    """(row, col) of the branch kernel's first tap in the d×d window."""
    return {"square": (0, 0), "row": (offsets[0], 0), "col": (0, offsets[1])}[kind.kernel]


class Branch(NamedTuple):
    """One branch of an ACBlock: its conv, its norm and where its kernel sits in the window.

    ``norm`` is the branch's BatchNorm2d (``branch_bn=True``), its learnable per-channel scale
    (``branch_scale=True``) or None (the kernels are summed as they are).
    """

    conv: nn.Conv2d
    norm: nn.Module | nn.Parameter | None
    row: int
    col: int
    name: str = ""


@dataclass
class Origin:
    """What ``acnet.convert`` put a block in place of: whether that conv had a bias, and the
    slot (an ``AbsorbedBatchNorm`` in the model) of the norm the block absorbed, where
    ``acnet.deploy`` puts it back. A deep copy or pickle of a model copies the link with it.
    ``legacy_pair``: the pair id of a block pickled by acnet 0.3 (deploy matches it by name)."""

    conv_bias: bool = True
    slot: nn.Module | None = None
    legacy_pair: str | None = None


def _ints(name: str, value: Any, minimum: int) -> None:
    """``value`` is an int >= ``minimum``, or a pair of them (nn.Conv2d's messages name neither)."""
    if isinstance(value, (tuple, list)) and len(value) != 2:
        raise InputError(f"{name} must be an int or a pair of ints, got {value!r}")
    for v in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InputTypeError(f"{name} must be an int or a pair of ints, got {value!r}")
        if v < minimum:
            raise InputError(f"{name} must be >= {minimum}, got {value!r}")


def _square(kernel_size: Any) -> int:
    """The d of a d×d kernel, d >= 2."""
    _ints("kernel_size", kernel_size, 1)
    h, w = kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size,) * 2
    if h != w:
        raise InputError(f"ACBlock needs a square kernel, got kernel_size={tuple(kernel_size)}")
    if h < 2:
        raise InputError(f"kernel_size must be >= 2 (a 1x1 kernel has no asymmetric part), "
                         f"got {h}")
    return h


def _check_geometry(in_channels: Any, out_channels: Any, kernel_size: Any, stride: Any,
                    padding: Any, dilation: Any, groups: Any, dtype: Any) -> int:
    """The ACB-specific checks, with messages naming the values; nn.Conv2d validates the rest
    (padding strings, padding_mode, 'same' with a stride). Returns d."""
    d = _square(kernel_size)
    for name, value, minimum in (("in_channels", in_channels, 1),
                                 ("out_channels", out_channels, 1), ("stride", stride, 1),
                                 ("dilation", dilation, 1), ("groups", groups, 1)):
        _ints(name, value, minimum)
    if not isinstance(padding, str):
        _ints("padding", padding, 0)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputTypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if in_channels % groups or out_channels % groups:
        raise InputError(f"groups={groups} must divide in_channels={in_channels} and "
                         f"out_channels={out_channels}")
    return d


class ACBlock(nn.Module):
    """Asymmetric Convolution Block (Ding et al., ICCV 2019).

    A drop-in for ``nn.Sequential(nn.Conv2d(..., bias=False), nn.BatchNorm2d(out_channels))``
    with a square d×d kernel: in training a 1×d and a d×1 branch, each with its BatchNorm, are
    summed with the square branch; ``fuse()`` returns one ``nn.Conv2d`` computing the same
    eval-mode function, ``reparameterize()`` switches to it in place.

    Training forms: ``branch_bn=False`` sums the kernels into one conv and one BatchNorm ``bn``;
    with ``branch_scale=True`` each kernel first gets a learnable per-channel scale
    (``NAME_scale``, initialised to ``gamma_init`` or 1): the online ACB. ``sub_batch`` (branch
    BNs): the branch statistics, with their gradient, come from the first ``sub_batch`` images
    (or that fraction of the batch) and one conv runs over the batch. ``fast_eval`` (default
    True): when every norm uses running statistics (each norm in its own mode), fold them into
    one kernel on every call (nothing cached) and run one conv.

    Args:
        in_channels: input channels, as ``nn.Conv2d``.
        out_channels: output channels.
        kernel_size: d, or (d, d): the square kernel's side.
        stride: as ``nn.Conv2d``.
        padding: as ``nn.Conv2d`` (ints or ``"same"``/``"valid"``).
        dilation: as ``nn.Conv2d``.
        groups: as ``nn.Conv2d`` (depthwise included).
        padding_mode: as ``nn.Conv2d``.
        horizontal: the 1×d branch.
        vertical: the d×1 branch.
        branch_bn: a BatchNorm per branch (False: one BatchNorm after the summed kernels).
        branch_scale: the online form's learnable per-channel branch scales (needs
            ``branch_bn=False``).
        affine: affine parameters in the BatchNorms.
        position: ``"center"`` (the skeleton) or ``"corner"`` for the thin kernels.
        gamma_init: initial BatchNorm scale of every branch (or of the branch scales).
        sub_batch: branch statistics from the first N images (int) or that fraction of the
            batch (float in (0, 1]); None: every image.
        eps: BatchNorm eps.
        momentum: BatchNorm momentum (None: cumulative average).
        fast_eval: fold the norms into one conv whenever every norm uses running statistics.
        device: where the parameters are created.
        dtype: floating-point dtype of the parameters.
    """

    __jit_unused_properties__: ClassVar[list[str]] = ["is_fused"]
    __jit_ignored_attributes__: ClassVar[list[str]] = ["_origin"]
    if TYPE_CHECKING:  # the submodules present depend on the options (TorchScript reads none)
        in_channels: int
        out_channels: int
        kernel_size: tuple[int, int]
        stride: tuple[int, int]
        dilation: tuple[int, int]
        padding: str | tuple[int, int]
        groups: int
        padding_mode: PaddingMode
        square_conv: nn.Conv2d
        hor_conv: nn.Conv2d
        ver_conv: nn.Conv2d
        square_bn: nn.BatchNorm2d
        hor_bn: nn.BatchNorm2d
        ver_bn: nn.BatchNorm2d
        bn: nn.Module  # a BatchNorm2d, or a FrozenBatchNorm2d after a frozen norm
        square_scale: nn.Parameter
        hor_scale: nn.Parameter
        ver_scale: nn.Parameter
        _taps: Tensor

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1,
                 padding_mode: PaddingMode = "zeros", *, horizontal: bool = True,
                 vertical: bool = True, branch_bn: bool = True, branch_scale: bool = False,
                 affine: bool = True, position: str = "center", gamma_init: float | None = None,
                 sub_batch: int | float | None = None, eps: float = 1e-5,
                 momentum: float | None = 0.1, fast_eval: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__()
        opts = ACBOptions(horizontal=horizontal, vertical=vertical, branch_bn=branch_bn,
                          branch_scale=branch_scale, affine=affine, position=position,
                          gamma_init=gamma_init, sub_batch=sub_batch, eps=eps,
                          momentum=momentum)
        if not isinstance(fast_eval, bool):
            raise InputTypeError(f"fast_eval must be a bool, got {fast_eval!r}")
        d = _check_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation,
                            groups, dtype)
        self.square_conv = nn.Conv2d(in_channels, out_channels, d, stride, padding, dilation,
                                     groups, bias=False, padding_mode=padding_mode,
                                     device=device, dtype=dtype)
        _copy_geometry(self, self.square_conv)
        self.horizontal, self.vertical = horizontal, vertical
        self.branch_bn, self.branch_scale, self.position = branch_bn, branch_scale, position
        self.offsets = branch_offsets(d, position)
        self.sub_batch = sub_batch
        self.fast_eval = fast_eval
        self._origin = Origin()  # set by acnet.convert, read by acnet.deploy
        # top, bottom, left, right
        self._pads = input_pads(self.square_conv.padding, d, self.square_conv.dilation)
        self.fused_conv: nn.Conv2d | None = None  # set by reparameterize()
        _add_branches(self, opts, {"device": device, "dtype": dtype})

    @torch.jit.unused
    def origin(self) -> Origin:
        """What convert put this block in place of (a fresh block: a conv with bias, no norm)."""
        return self._origin

    @torch.jit.unused
    def set_origin(self, *, conv_bias: bool, slot: nn.Module | None) -> None:
        """Record the replaced conv's bias and the slot of the norm this block absorbed."""
        self._origin = Origin(conv_bias, slot)

    # ------------------------------------------------------------------ structure
    @property
    def is_fused(self) -> bool:
        """True after ``reparameterize()``: the block then holds only ``fused_conv``."""
        return "fused_conv" in self._modules

    def batch_norms(self) -> list[nn.Module]:
        """The block's norms in branch order, then ``bn`` (a BatchNorm2d, or a frozen norm);
        none once fused."""
        return [m for n in (*(f"{k.name}_bn" for k in BRANCHES), "bn")
                if (m := self._modules.get(n)) is not None]

    def branches(self) -> list[Branch]:
        """Each present branch: (conv, its BatchNorm / scale / None, row, col, name)."""
        return [Branch(cast(nn.Conv2d, self._modules[f"{k.name}_conv"]),
                       self._modules.get(f"{k.name}_bn", self._parameters.get(f"{k.name}_scale")),
                       *_place(k, self.offsets), k.name)
                for k in BRANCHES if f"{k.name}_conv" in self._modules]

    def extra_repr(self) -> str:
        return _describe(self)

    def new_conv(self, *, bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> nn.Conv2d:
        """A fresh ``nn.Conv2d`` with this block's geometry (on its device and dtype by default)."""
        ref = next(iter(self.parameters()))
        return nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, bias=bias, padding_mode=self.padding_mode,
            device=ref.device if device is None else device,
            dtype=ref.dtype if dtype is None else dtype,
        )

    # ------------------------------------------------------------------ kernels
    def _kernels(self) -> list[Tensor]:
        """The present branch kernels in branch order (TorchScript's twin of branches())."""
        out = [self.square_conv.weight]
        if hasattr(self, "hor_conv"):
            out.append(self.hor_conv.weight)
        if hasattr(self, "ver_conv"):
            out.append(self.ver_conv.weight)
        return out

    def merge(self, kernels: list[Tensor], scales: list[Tensor] | None = None) -> Tensor:
        """Σ scales[b] · embed(kernels[b]) as one d×d kernel, the kernels in branch order."""
        return merge_kernels(kernels, self._taps, scales)

    def merged_kernel(self) -> Tensor:
        """Σ scale_b · embed(W_b) in d×d form (differentiable): the kernel of branch_bn=False."""
        scales: list[Tensor] | None = None
        if hasattr(self, "square_scale"):
            scales = [self.square_scale]
            if hasattr(self, "hor_scale"):
                scales.append(self.hor_scale)
            if hasattr(self, "ver_scale"):
                scales.append(self.ver_scale)
        return self.merge(self._kernels(), scales)

    @torch.jit.unused
    def branch_scales(self, dtype: torch.dtype) -> Tensor:
        """(branches, C) factors of the eval-mode function: each branch's BN γ/σ (running
        statistics), its learned scale, or 1; differentiable."""
        branches = self.branches()
        if self.branch_bn:
            return norms.scale_shift([b.norm for b in branches], dtype)[0]
        if self.branch_scale:
            return torch.stack([cast(Tensor, b.norm).to(dtype) for b in branches])
        ref = branches[0].conv.weight
        return torch.ones(len(branches), self.out_channels, dtype=dtype, device=ref.device)

    @torch.jit.unused
    def _fold(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(kernel, bias) of the eval-mode function, computed in ``dtype``; differentiable."""
        branches = self.branches()
        kernels = [b.conv.weight.to(dtype) for b in branches]
        if self.branch_bn:
            scale, shift = norms.scale_shift([b.norm for b in branches], dtype)
            return self.merge(kernels, list(scale.unbind(0))), shift.sum(0)
        scale, shift = norms.scale_shift([self.bn], dtype)
        kernel = self.merge(kernels, [cast(Tensor, b.norm).to(dtype) for b in branches]
                            if self.branch_scale else None)
        return kernel * scale[0].view(-1, 1, 1, 1).to(kernel.dtype), shift[0]

    @torch.jit.unused
    def _one_conv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """(input, kernel, bias) of one conv that computes the block now, or None: every norm
        on running statistics (eval mode, frozen norms: the fold, never cached, differentiable,
        in float32 for half types), or branch statistics from a sub-batch (``sub_batch``)."""
        if self.fast_eval and not any(norms.batch_stats_now(n) for n in self.batch_norms()):
            ref = self.square_conv.weight
            low = ref.dtype in (torch.float16, torch.bfloat16)
            kernel, bias = self._fold(torch.float32 if low else ref.dtype)
            return x, kernel.to(ref.dtype), bias.to(ref.dtype)
        return sub_batch_weights(self, x)

    # ------------------------------------------------------------------ forward
    def branch_output(self, x: Tensor, weight: Tensor, row: int = 0, col: int = 0,
                      bias: Tensor | None = None) -> Tensor:
        """A (kh, kw) kernel whose taps sit at (row, col) of the window, run as the square conv
        runs (same output size and alignment; ``branch_conv``)."""
        return branch_conv(x, weight, bias, row, col, self.kernel_size[0], self.stride,
                           self.dilation, self.groups, self._pads, self.padding_mode)

    def _branch_sum(self, x: Tensor) -> Tensor:
        """Norms on batch statistics: bn(conv(merged kernel)), or Σ_b bn_b(conv_b(x)) with each
        branch at the square's output size (TorchScript's twin of branches())."""
        if hasattr(self, "bn"):
            return self.bn(self.branch_output(x, self.merged_kernel()))
        r0, c0 = self.offsets
        out = self.square_bn(self.branch_output(x, self.square_conv.weight))
        # in-place sums: a BN's output is not saved for its backward, so this is autograd-safe
        if hasattr(self, "hor_bn"):
            out = out.add_(self.hor_bn(self.branch_output(x, self.hor_conv.weight, r0, 0)))
        if hasattr(self, "ver_bn"):
            out = out.add_(self.ver_bn(self.branch_output(x, self.ver_conv.weight, 0, c0)))
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Three paths: the fused conv (after ``reparameterize``); one conv with a kernel and
        bias computed now (``_one_conv``); the norms on batch statistics (``_branch_sum``)."""
        if self.fused_conv is not None:
            return self.fused_conv(x)
        if not torch.jit.is_scripting():
            one = self._one_conv(x)
            if one is not None:
                return self.branch_output(one[0], one[1], 0, 0, one[2])
        return self._branch_sum(x)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle, also blocks pickled by earlier versions (``_upgrade``)."""
        super().__setstate__(_upgrade(state))
        if "fused_conv" not in self._modules:
            self.__dict__.setdefault("fused_conv", None)
            if "_taps" not in self._buffers:
                _register_taps(self)

    # ------------------------------------------------------------------ fusion
    def fused_weights(self) -> tuple[Tensor, Tensor]:
        """(kernel, bias) of the equivalent conv, in float64, from the norms' running statistics."""
        conv = self.fused_conv
        if conv is not None and conv.bias is not None:
            return conv.weight.detach().double(), conv.bias.detach().double()
        with torch.no_grad():
            return self._fold(torch.float64)

    def fuse(self) -> nn.Conv2d:
        """A new ``nn.Conv2d`` (with bias) computing this block's eval-mode function."""
        kernel, bias = self.fused_weights()
        conv = self.new_conv(bias=True)
        with torch.no_grad():
            conv.weight.copy_(kernel)
            cast(Tensor, conv.bias).copy_(bias)
        return conv

    def reparameterize(self) -> None:
        """Switch to the fused conv in place; safe to call more than once."""
        if self.is_fused:
            return
        fused = self.fuse()
        fused.train(self.training)
        for name in _CHILDREN:
            self._modules.pop(name, None)
        for name in _SCALES:
            self._parameters.pop(name, None)
        self._buffers.pop("_taps", None)
        self.fused_conv = fused


def _copy_geometry(block: ACBlock, sq: nn.Conv2d) -> None:
    """The block's conv geometry attributes, as the square conv normalized them."""
    d = sq.kernel_size[0]
    block.in_channels, block.out_channels = sq.in_channels, sq.out_channels
    block.kernel_size = (d, d)
    block.stride = (sq.stride[0], sq.stride[1])
    block.dilation = (sq.dilation[0], sq.dilation[1])
    block.padding = sq.padding if isinstance(sq.padding, str) else (sq.padding[0], sq.padding[1])
    block.groups, block.padding_mode = sq.groups, sq.padding_mode


def _register_taps(block: ACBlock) -> None:
    """The non-persistent buffer of flat window positions of the hor/ver kernel taps."""
    branches = block.branches()
    taps = tap_indices(block.kernel_size[0], [(*b.conv.weight.shape[-2:], b.row, b.col)
                                              for b in branches[1:]])
    block.register_buffer("_taps", taps.to(branches[0].conv.weight.device), persistent=False)


def _upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """The state of a block pickled by an earlier version, in today's form: no kernel cache, an
    ``Origin`` instead of a pair id and a bias flag (0.3), options added since with their
    defaults."""
    state.pop("_fused_cache", None)
    if "_origin" not in state:
        state["_origin"] = Origin(state.pop("acnet_conv_bias", True), None,
                                  state.pop("acnet_pair_id", None))
    for name, default in (("branch_scale", False), ("sub_batch", None)):
        state.setdefault(name, default)
    return state


def _add_branches(block: ACBlock, opts: ACBOptions, fk: dict[str, Any]) -> None:
    """Create ``block``'s asymmetric branch convs, its BatchNorms or scales, and the taps."""
    d = block.kernel_size[0]
    cin, cout = block.in_channels, block.out_channels
    bn_kw = {"eps": float(opts.eps), "momentum": opts.momentum, "affine": opts.affine, **fk}
    conv_kw = {"stride": block.stride, "dilation": block.dilation, "groups": block.groups,
               "bias": False, **fk}
    kinds = [k for k in BRANCHES if k.option is None or getattr(opts, k.option)]
    for k in kinds:  # conv, then its BN: the official repo's state_dict order
        if k.kernel != "square":
            setattr(block, f"{k.name}_conv", nn.Conv2d(cin, cout, _shape(k, d), **conv_kw))
        if block.branch_bn:
            setattr(block, f"{k.name}_bn", nn.BatchNorm2d(cout, **bn_kw))
    if not block.branch_bn:
        block.bn = nn.BatchNorm2d(cout, **bn_kw)
    init = 1.0 if opts.gamma_init is None else float(opts.gamma_init)
    if block.branch_scale:
        for k in kinds:
            setattr(block, f"{k.name}_scale", nn.Parameter(torch.full((cout,), init, **fk)))
    elif opts.gamma_init is not None:
        for bn in block.batch_norms():
            nn.init.constant_(cast(Tensor, bn.weight), init)
    _register_taps(block)


def _describe(block: ACBlock) -> str:
    """The block's extra_repr: its geometry, then its ACB options until fused."""
    s = (f"{block.in_channels}, {block.out_channels}, kernel_size={block.kernel_size}, "
         f"stride={block.stride}, padding={block.padding}")
    for name, default in (("dilation", (1, 1)), ("groups", 1), ("padding_mode", "zeros")):
        if getattr(block, name) != default:
            s += f", {name}={getattr(block, name)!r}"
    if not block.is_fused:
        s += (f", horizontal={block.horizontal}, vertical={block.vertical}, "
              f"branch_bn={block.branch_bn}, position={block.position!r}")
        if block.branch_scale:
            s += ", branch_scale=True"
        if block.sub_batch is not None:
            s += f", sub_batch={block.sub_batch!r}"
        s += f", fast_eval={block.fast_eval}"
    return s
