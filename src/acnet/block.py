"""ACBlock: a square conv-BN strengthened by 1×d and d×1 branches, fusable into one conv."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, cast

import torch
from torch import Tensor, nn

from . import norms
from ._sub_batch import sub_batch_forward
from .alignment import branch_conv, input_pads
from .errors import InputError, InputTypeError
from .fusion import branch_offsets, merge_kernels, tap_indices
from .options import ACBOptions

__all__ = ["ACBlock", "Branch"]

PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
_BRANCH_MODULES = ("square_conv", "square_bn", "hor_conv", "hor_bn", "ver_conv", "ver_bn", "bn")
_SCALES = ("square_scale", "hor_scale", "ver_scale")


class Branch(NamedTuple):
    """One branch of an ACBlock: its conv, its norm and where its kernel sits in the window.

    ``norm`` is the branch's BatchNorm2d (``branch_bn=True``), its learnable per-channel scale
    (``branch_scale=True``) or None (the kernels are summed as they are).
    """

    conv: nn.Conv2d
    norm: nn.Module | nn.Parameter | None
    row: int
    col: int


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
    with a square d×d kernel: during training it adds a 1×d and a d×1 branch, each with its own
    BatchNorm, summed with the square branch. ``fuse()`` returns one ``nn.Conv2d`` computing the
    same eval-mode function; ``reparameterize()`` switches the block to it in place.

    ``branch_bn=False`` sums the three kernels into one conv followed by one BatchNorm ``bn``;
    with ``branch_scale=True`` each branch kernel is first multiplied by a learnable
    per-output-channel scale (``square_scale``, ``hor_scale``, ``ver_scale``, initialised to
    ``gamma_init`` or 1; ``bn`` keeps weight 1): the "online" ACB, one conv per training step.
    ``sub_batch`` (branch BNs only): in training, the branch BatchNorms take their statistics
    (and their gradient) from the first ``sub_batch`` images of the batch, or that fraction of
    it, and the block runs one conv over the whole batch with the kernel and bias those
    statistics give: the ACB at a fraction of its training cost (exactly the ACB when it covers
    the batch). ``fast_eval`` (default True): whenever every norm of the block uses running
    statistics (eval mode, or frozen norms in training), fold them into one kernel on every
    call (a few small ops, nothing cached, so it always reflects the current weights, however
    they were changed) and run one conv; False runs the branches one by one. Each norm follows
    its own mode.
    """

    __jit_unused_properties__: ClassVar[list[str]] = ["is_fused"]
    if TYPE_CHECKING:  # the submodules present depend on the options (TorchScript reads none)
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

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        padding_mode: PaddingMode = "zeros",
        *,
        horizontal: bool = True,
        vertical: bool = True,
        branch_bn: bool = True,
        branch_scale: bool = False,
        affine: bool = True,
        position: str = "center",
        gamma_init: float | None = None,
        sub_batch: int | float | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        fast_eval: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
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
        sq = self.square_conv
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (d, d)
        self.stride: tuple[int, int] = (sq.stride[0], sq.stride[1])
        self.dilation: tuple[int, int] = (sq.dilation[0], sq.dilation[1])
        self.padding: str | tuple[int, int] = (
            sq.padding if isinstance(sq.padding, str) else (sq.padding[0], sq.padding[1]))
        self.groups, self.padding_mode = groups, padding_mode
        self.horizontal, self.vertical = horizontal, vertical
        self.branch_bn, self.branch_scale, self.position = branch_bn, branch_scale, position
        self.offsets = branch_offsets(d, position)
        self.sub_batch = sub_batch
        self.fast_eval = fast_eval
        # set by acnet.convert, read by acnet.deploy: the id of the BatchNorm slot convert
        # emptied for this block (None: no BN absorbed), and whether the replaced conv had a bias
        self.acnet_pair_id: str | None = None
        self.acnet_conv_bias: bool = True
        self._pads = input_pads(sq.padding, d, sq.dilation)  # top, bottom, left, right
        self.fused_conv: nn.Conv2d | None = None  # set by reparameterize()
        _add_branches(self, opts, {"device": device, "dtype": dtype})

    def _register_taps(self) -> None:
        """The non-persistent buffer of flat window positions of the hor/ver kernel taps."""
        branches = self.branches()
        taps = tap_indices(self.kernel_size[0], [(*b.conv.weight.shape[-2:], b.row, b.col)
                                                 for b in branches[1:]])
        self.register_buffer("_taps", taps.to(branches[0].conv.weight.device), persistent=False)

    # ------------------------------------------------------------------ structure
    @property
    def is_fused(self) -> bool:
        """True after ``reparameterize()``: the block then holds only ``fused_conv``."""
        return "fused_conv" in self._modules

    def batch_norms(self) -> list[nn.Module]:
        """The block's norms (BatchNorm2d, or a frozen norm as ``bn``; none once fused)."""
        return [m for n in ("square_bn", "hor_bn", "ver_bn", "bn")
                if (m := self._modules.get(n)) is not None]

    def branches(self) -> list[Branch]:
        """Each present branch: (conv, its BatchNorm / scale / None, row, col in the window)."""
        if self.is_fused:
            return []
        r0, c0 = self.offsets
        out = []
        for name, present, row, col in (("square", True, 0, 0), ("hor", self.horizontal, r0, 0),
                                        ("ver", self.vertical, 0, c0)):
            if present:
                norm = self._modules.get(f"{name}_bn", self._parameters.get(f"{name}_scale"))
                out.append(Branch(cast(nn.Conv2d, self._modules[f"{name}_conv"]), norm, row,
                                  col))
        return out

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
        """The present branch kernels in branch order (TorchScript-friendly twin of branches())."""
        out = [self.square_conv.weight]
        if hasattr(self, "hor_conv"):
            out.append(self.hor_conv.weight)
        if hasattr(self, "ver_conv"):
            out.append(self.ver_conv.weight)
        return out

    def _scales(self) -> list[Tensor] | None:
        """The branch scales of the online block, None without ``branch_scale``."""
        if not hasattr(self, "square_scale"):
            return None
        out: list[Tensor] = [self.square_scale]
        if hasattr(self, "hor_scale"):
            out.append(self.hor_scale)
        if hasattr(self, "ver_scale"):
            out.append(self.ver_scale)
        return out

    def merged_kernel(self) -> Tensor:
        """Σ scale_b · embed(W_b) in d×d form (differentiable): the kernel of branch_bn=False."""
        return merge_kernels(self._kernels(), self._taps, self._scales())

    def _fold(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(kernel, bias) of the eval-mode function, computed in ``dtype``; differentiable.

        Each branch kernel is scaled per output channel by its BN's γ/σ (branch_bn), its
        learned scale (branch_scale) or 1, embedded and summed; without branch BNs the single
        ``bn`` is folded into the sum.
        """
        branches = self.branches()
        kernels = [b.conv.weight.to(dtype) for b in branches]
        if self.branch_bn:
            scale, shift = norms.scale_shift([b.norm for b in branches], dtype)
            return merge_kernels(kernels, self._taps, list(scale.unbind(0))), shift.sum(0)
        scale, shift = norms.scale_shift([self.bn], dtype)
        scales = [cast(Tensor, b.norm).to(dtype) for b in branches] if self.branch_scale else None
        kernel = merge_kernels(kernels, self._taps, scales)
        return kernel * scale[0].view(-1, 1, 1, 1).to(kernel.dtype), shift[0]

    @torch.jit.unused
    def _eval_weights(self) -> tuple[Tensor, Tensor] | None:
        """The fused (kernel, bias), folded now; None if a norm normalizes with batch statistics
        in its current mode (each norm's own mode counts, not the block's).

        Folded in the parameters' dtype (float32 for half types), differentiably when autograd
        records, and never cached: it follows every change of weights, statistics or settings.
        """
        if any(norms.batch_stats_now(n) for n in self.batch_norms()):
            return None
        ref = self.square_conv.weight
        low = ref.dtype in (torch.float16, torch.bfloat16)
        kernel, bias = self._fold(torch.float32 if low else ref.dtype)
        return kernel.to(ref.dtype), bias.to(ref.dtype)

    # ------------------------------------------------------------------ forward
    def _conv(self, x: Tensor, weight: Tensor, row: int, col: int,
              bias: Tensor | None) -> Tensor:
        """A (kh, kw) kernel whose taps sit at (row, col) of the window, aligned with the square
        conv (``branch_conv``)."""
        return branch_conv(x, weight, bias, row, col, self.kernel_size[0], self.stride,
                           self.dilation, self.groups, self._pads, self.padding_mode)

    def _branch_sum(self, x: Tensor) -> Tensor:
        """Σ_b bn_b(conv_b(x)): the branch-BN block, each branch at the square's output size."""
        r0, c0 = self.offsets
        out = self.square_bn(self._conv(x, self.square_conv.weight, 0, 0, None))
        # in-place sums: a BN's output is not saved for its backward, so this is autograd-safe
        if hasattr(self, "hor_bn"):
            out = out.add_(self.hor_bn(self._conv(x, self.hor_conv.weight, r0, 0, None)))
        if hasattr(self, "ver_bn"):
            out = out.add_(self.ver_bn(self._conv(x, self.ver_conv.weight, 0, c0, None)))
        return out

    def forward(self, x: Tensor) -> Tensor:
        if self.fused_conv is not None:
            return self.fused_conv(x)
        if self.fast_eval and not torch.jit.is_scripting():
            # norms on running statistics (eval mode, frozen) are affine maps: one conv
            fused = self._eval_weights()
            if fused is not None:
                return self._conv(x, fused[0], 0, 0, fused[1])
        if hasattr(self, "bn"):
            return self.bn(self._conv(x, self.merged_kernel(), 0, 0, None))
        if not torch.jit.is_scripting():
            out = self._sub_batch(x)
            if out is not None:
                return out
        return self._branch_sum(x)

    @torch.jit.unused
    def _sub_batch(self, x: Tensor) -> Tensor | None:
        """Training with branch statistics from a sub-batch (``sub_batch``), else None."""
        return sub_batch_forward(self, x)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle, also blocks pickled by earlier versions (no scales or taps; a kernel cache)."""
        state.pop("_fused_cache", None)
        super().__setstate__(state)
        self.__dict__.setdefault("branch_scale", False)
        self.__dict__.setdefault("sub_batch", None)
        if "fused_conv" not in self._modules:
            self.__dict__.setdefault("fused_conv", None)
            if "_taps" not in self._buffers:
                self._register_taps()

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
        for name in _BRANCH_MODULES:
            self._modules.pop(name, None)
        for name in _SCALES:
            self._parameters.pop(name, None)
        self._buffers.pop("_taps", None)
        self.fused_conv = fused


def _add_branches(block: ACBlock, opts: ACBOptions, fk: dict[str, Any]) -> None:
    """Create ``block``'s asymmetric branch convs, its BatchNorms or scales, and the taps."""
    d = block.kernel_size[0]
    cin, cout = block.in_channels, block.out_channels
    bn_kw = {"eps": float(opts.eps), "momentum": opts.momentum, "affine": opts.affine, **fk}
    conv_kw = {"stride": block.stride, "dilation": block.dilation, "groups": block.groups,
               "bias": False, **fk}
    shapes = {"square": None, "hor": (1, d), "ver": (d, 1)}
    names = ["square"] + ["hor"] * block.horizontal + ["ver"] * block.vertical
    for name in names:  # conv, then its BN: the official repo's state_dict order
        shape = shapes[name]
        if shape is not None:
            setattr(block, f"{name}_conv", nn.Conv2d(cin, cout, shape, **conv_kw))
        if block.branch_bn:
            setattr(block, f"{name}_bn", nn.BatchNorm2d(cout, **bn_kw))
    if not block.branch_bn:
        block.bn = nn.BatchNorm2d(cout, **bn_kw)
    init = 1.0 if opts.gamma_init is None else float(opts.gamma_init)
    if block.branch_scale:
        for name in names:
            setattr(block, f"{name}_scale", nn.Parameter(torch.full((cout,), init, **fk)))
    elif opts.gamma_init is not None:
        for bn in block.batch_norms():
            nn.init.constant_(cast(Tensor, bn.weight), init)
    block._register_taps()


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
