"""ACBlock: a square conv-BN strengthened by 1×d and d×1 branches, fusable into one conv."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fusion import bn_scale_shift, branch_offsets, fold_bn, merge_kernels, tap_indices

__all__ = ["ACBlock", "Branch", "PADDING_MODES"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_BRANCH_MODULES = ("square_conv", "square_bn", "hor_conv", "hor_bn", "ver_conv", "ver_bn", "bn")
_SCALES = ("square_scale", "hor_scale", "ver_scale")


class Branch(NamedTuple):
    """One branch of an ACBlock: its conv, its norm and where its kernel sits in the window.

    ``norm`` is the branch's BatchNorm2d (``branch_bn=True``), its learnable per-channel scale
    (``branch_scale=True``) or None (the kernels are summed as they are).
    """

    conv: nn.Conv2d
    norm: nn.BatchNorm2d | nn.Parameter | None
    row: int
    col: int


# ---------------------------------------------------------------------- argument checks
def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _pair(name: str, value: Any, minimum: int) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair, got {value!r}")
        return _int(name, value[0], minimum), _int(name, value[1], minimum)
    v = _int(name, value, minimum)
    return v, v


def _square_kernel(value: Any) -> int:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"kernel_size must be an int or a pair, got {value!r}")
        h, w = _int("kernel_size", value[0], 1), _int("kernel_size", value[1], 1)
        if h != w:
            raise ValueError(f"ACBlock needs a square kernel, got kernel_size={tuple(value)}")
        value = h
    d = _int("kernel_size", value, 1)
    if d < 2:
        raise ValueError(
            f"kernel_size must be >= 2 (a 1x1 kernel has no asymmetric part), got {d}"
        )
    return d


def _check_geometry(
    in_channels: Any, out_channels: Any, kernel_size: Any, stride: Any, dilation: Any,
    groups: Any, padding_mode: Any,
) -> tuple[int, int, int, tuple[int, int], tuple[int, int], int]:
    """Validated (in_channels, out_channels, d, stride, dilation, groups)."""
    cin = _int("in_channels", in_channels, 1)
    cout = _int("out_channels", out_channels, 1)
    d = _square_kernel(kernel_size)
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    groups = _int("groups", groups, 1)
    if cin % groups or cout % groups:
        raise ValueError(
            f"groups={groups} must divide in_channels={cin} and out_channels={cout}"
        )
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    return cin, cout, d, stride, dilation, groups


def _check_padding(
    padding: Any, d: int, stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[str | tuple[int, int], tuple[int, int, int, int]]:
    """(padding as nn.Conv2d keeps it, (top, bottom, left, right) pads of the input)."""
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding string must be 'same' or 'valid', got {padding!r}")
        if padding == "same" and stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
        if padding == "valid":
            return padding, (0, 0, 0, 0)
        th, tw = dilation[0] * (d - 1), dilation[1] * (d - 1)
        return padding, (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    ph, pw = _pair("padding", padding, 0)
    return (ph, pw), (ph, ph, pw, pw)


def _check_options(flags: dict[str, Any], gamma_init: Any, eps: Any, momentum: Any) -> None:
    """Type and range checks of the branch and BatchNorm options."""
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if flags["branch_scale"] and flags["branch_bn"]:
        raise ValueError("branch_scale=True needs branch_bn=False (the scales replace the "
                         "branch BatchNorms), got branch_bn=True")
    if gamma_init is not None:
        if isinstance(gamma_init, bool) or not isinstance(gamma_init, (int, float)):
            raise TypeError(f"gamma_init must be a float or None, got {gamma_init!r}")
        if not math.isfinite(gamma_init):
            raise ValueError(f"gamma_init must be finite, got {gamma_init}")
        if not flags["affine"] and not flags["branch_scale"]:
            raise ValueError("gamma_init needs affine=True (a BN without affine has no scale)")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
        raise ValueError(f"momentum must be None or in [0, 1], got {momentum!r}")


def _axis_plan(
    length: int, pad_before: int, n: int, stride: int, dilation: int, k: int, offset: int
) -> tuple[int, int, int, int, int]:
    """How to feed one axis of a branch so it yields exactly ``n`` outputs aligned with the square.

    The branch's first tap sits ``offset`` rows after the square window's first tap, in the
    square conv's padded coordinates. Returns (crop_start, crop_end, conv_padding, extra_before,
    extra_after): crop the input to [start, end), zero-pad it by the extras, then convolve with
    symmetric padding ``conv_padding``. The conv's own padding is used whenever it is equivalent.
    """
    span = (n - 1) * stride + dilation * (k - 1) + 1
    start = offset - pad_before
    end = start + span
    a = min(max(start, 0), length)
    b = min(max(end, 0), length)
    lead = max(0, min(end, 0) - start)  # zeros needed before the input
    trail = max(0, end - max(start, length))  # zeros needed after it
    if a == b:  # only padding is read: no conv padding on an empty input
        return a, b, 0, lead, trail
    reach = dilation * (k - 1) + 1
    if trail <= lead and a - lead == start:
        if (length - a + 2 * lead - reach) // stride + 1 == n:
            return a, length, lead, 0, 0
        if (b - a + 2 * lead - reach) // stride + 1 == n:
            return a, b, lead, 0, 0
    sym = min(lead, trail)
    return a, b, sym, lead - sym, trail - sym


def _branch_plan(
    d: int, stride: tuple[int, int], dilation: tuple[int, int], pads: tuple[int, int, int, int],
    h: int, w: int, kh: int, kw: int, row: int, col: int,
) -> tuple[int, int, int, int, int, int, int, int, int, int]:
    """Both axis plans (rows, then columns) of a (kh, kw) kernel at (row, col) on h×w."""
    top, bottom, left, right = pads
    sh, sw = stride
    dh, dw = dilation
    nh = (h + top + bottom - dh * (d - 1) - 1) // sh + 1
    nw = (w + left + right - dw * (d - 1) - 1) // sw + 1
    if nh < 1 or nw < 1:
        raise ValueError(
            "input of size " + str(h) + "x" + str(w) + " with padding " + str(pads)
            + " (top, bottom, left, right) is too small for kernel " + str(d)
            + " with dilation " + str(dilation))
    ah, bh, ph, eh0, eh1 = _axis_plan(h, top, nh, sh, dh, kh, dh * row)
    aw, bw, pw, ew0, ew1 = _axis_plan(w, left, nw, sw, dw, kw, dw * col)
    return ah, bh, ph, eh0, eh1, aw, bw, pw, ew0, ew1


_cached_branch_plan = functools.lru_cache(maxsize=4096)(_branch_plan)


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
    ``fast_eval`` (default True): in eval mode run one conv with the fused kernel, cached while
    no parameter or buffer changes (recomputed, differentiably, when gradients are needed);
    False runs the branches one by one, e.g. to check the fusion against them.
    """

    __jit_unused_properties__ = ["is_fused"]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        *,
        horizontal: bool = True,
        vertical: bool = True,
        branch_bn: bool = True,
        branch_scale: bool = False,
        affine: bool = True,
        position: str = "center",
        gamma_init: float | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        fast_eval: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        cin, cout, d, stride, dilation, groups = _check_geometry(
            in_channels, out_channels, kernel_size, stride, dilation, groups, padding_mode)
        r0, c0 = branch_offsets(d, position)
        padding, pads = _check_padding(padding, d, stride, dilation)
        _check_options(dict(horizontal=horizontal, vertical=vertical, branch_bn=branch_bn,
                            branch_scale=branch_scale, affine=affine, fast_eval=fast_eval),
                       gamma_init, eps, momentum)
        self.in_channels = cin
        self.out_channels = cout
        self.kernel_size = (d, d)
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.padding_mode = padding_mode
        self.horizontal = horizontal
        self.vertical = vertical
        self.branch_bn = branch_bn
        self.branch_scale = branch_scale
        self.position = position
        self.offsets = (r0, c0)
        self.fast_eval = fast_eval
        # set by acnet.convert, read by acnet.deploy: the id of the BatchNorm slot convert
        # emptied for this block (None: no BN absorbed), and whether the replaced conv had a bias
        self.acnet_pair_id: str | None = None
        self.acnet_conv_bias: bool = True
        self._pads = pads  # top, bottom, left, right
        self._fused_cache: tuple[Any, ...] | None = None
        self.fused_conv: nn.Conv2d | None = None  # set by reparameterize()
        self._build({"device": device, "dtype": dtype}, float(eps), momentum, affine, gamma_init)

    def _build(self, fk: dict[str, Any], eps: float, momentum: float | None, affine: bool,
               gamma_init: float | None) -> None:
        """Create the branch convs, their BatchNorms or scales, and the tap indices."""
        d = self.kernel_size[0]
        cin, cout = self.in_channels, self.out_channels
        bn_kw = {"eps": eps, "momentum": momentum, "affine": affine, **fk}
        conv_kw = {"stride": self.stride, "dilation": self.dilation, "groups": self.groups,
                   "bias": False, **fk}
        self.square_conv = nn.Conv2d(cin, cout, d, padding=self.padding,
                                     padding_mode=self.padding_mode, **conv_kw)
        shapes = [("square", (d, d))]
        if self.horizontal:
            shapes.append(("hor", (1, d)))
        if self.vertical:
            shapes.append(("ver", (d, 1)))
        for name, shape in shapes:
            if name != "square":
                setattr(self, f"{name}_conv", nn.Conv2d(cin, cout, shape, **conv_kw))
            if self.branch_bn:
                setattr(self, f"{name}_bn", nn.BatchNorm2d(cout, **bn_kw))
        if not self.branch_bn:
            self.bn = nn.BatchNorm2d(cout, **bn_kw)
        if self.branch_scale:
            init = 1.0 if gamma_init is None else float(gamma_init)
            for name, _ in shapes:
                setattr(self, f"{name}_scale", nn.Parameter(torch.full((cout,), init, **fk)))
        elif gamma_init is not None:
            for bn in self.batch_norms():
                nn.init.constant_(bn.weight, float(gamma_init))
        self._register_taps()

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

    def batch_norms(self) -> list[nn.BatchNorm2d]:
        """The block's BatchNorm layers (none once fused)."""
        return [self._modules[n] for n in ("square_bn", "hor_bn", "ver_bn", "bn")
                if n in self._modules]

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
                out.append(Branch(self._modules[f"{name}_conv"], norm, row, col))
        return out

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if not self.is_fused:
            s += (f", horizontal={self.horizontal}, vertical={self.vertical}, "
                  f"branch_bn={self.branch_bn}, position={self.position!r}")
            if self.branch_scale:
                s += ", branch_scale=True"
            s += f", fast_eval={self.fast_eval}"
        return s

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
        out = [self.square_scale]
        if hasattr(self, "hor_scale"):
            out.append(self.hor_scale)
        if hasattr(self, "ver_scale"):
            out.append(self.ver_scale)
        return out

    def merged_kernel(self) -> Tensor:
        """Σ scale_b · embed(W_b) in d×d form (differentiable): the kernel of branch_bn=False."""
        return merge_kernels(self._kernels(), self._taps, self._scales())

    def _fold(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(kernel, bias) of the eval-mode function: the one fold behind every fused form.

        Each branch kernel is scaled per output channel by its BN's γ/σ (branch_bn), its
        learned scale (branch_scale) or 1, embedded and summed; without branch BNs the single
        ``bn`` is folded into the sum. Differentiable; computed in ``dtype`` (default: the
        parameters' own).
        """
        branches = self.branches()
        dtype = dtype or branches[0].conv.weight.dtype
        kernels = [b.conv.weight.to(dtype) for b in branches]
        if not self.branch_bn:
            scales = None if not self.branch_scale else [b.norm.to(dtype) for b in branches]
            return _fold_module(merge_kernels(kernels, self._taps, scales), self.bn)
        bns = [b.norm for b in branches]
        for bn in bns:
            _check_running_stats(bn)
        eps = bns[0].eps if len({bn.eps for bn in bns}) == 1 else torch.tensor(
            [[bn.eps] for bn in bns], dtype=dtype, device=bns[0].running_var.device)
        scale, shift = bn_scale_shift(_stack(bns, "running_mean", dtype),
                                      _stack(bns, "running_var", dtype), eps,
                                      _stack(bns, "weight", dtype), _stack(bns, "bias", dtype))
        return merge_kernels(kernels, self._taps, list(scale.unbind(0))), shift.sum(0)

    def _state_key(self) -> tuple[Any, ...] | None:
        """What the fused kernel depends on: identity, version, storage and requires_grad of
        every parameter and buffer, and each BN's ``track_running_stats``; None for inference
        tensors (no version counter). Dtype/device changes go through ``_apply`` (clears it).
        """
        key: list[Any] = []
        try:
            for m in (self, *self._modules.values()):
                key.append(m.__dict__.get("track_running_stats"))
                for group in (m._parameters, m._buffers):
                    for t in group.values():
                        if t is not None:
                            key += (id(t), t._version, t.data_ptr(), t.requires_grad)
        except RuntimeError:  # "Inference tensors do not track version counter"
            return None
        return tuple(key)

    @torch.jit.unused
    def _eval_weights(self) -> tuple[Tensor, Tensor] | None:
        """Fused (kernel, bias) for the eval fast path; None if a BN uses batch statistics.

        Cached while no parameter or buffer changes, unless gradients must flow into the
        parameters (then recomputed, differentiably) or under torch.compile/export (traced).
        """
        compiling = torch.compiler.is_compiling()
        key = None if compiling else self._state_key()
        cache = self._fused_cache
        if key is not None and cache is not None and cache[0] == key and not (
                torch.is_grad_enabled() and cache[3]):
            return cache[1], cache[2]
        if not all(bn.track_running_stats and bn.running_var is not None
                   for bn in self.batch_norms()):
            return None
        needs_grad = any(p.requires_grad for p in self.parameters())
        if compiling or (torch.is_grad_enabled() and needs_grad):
            return self._fold()
        ref = self.square_conv.weight
        exact = torch.float32 if ref.device.type == "mps" else torch.float64  # as fuse() does
        # a normal tensor even under inference_mode, so later autograd may save it
        normal = torch.inference_mode(False) if key is not None else contextlib.nullcontext()
        with torch.no_grad(), normal:
            kernel, bias = self._fold(exact)
            kernel, bias = kernel.to(ref.dtype), bias.to(ref.dtype)
        # the cache keeps the key's tensors alive, so their ids cannot be reused meanwhile
        self._fused_cache = None if key is None else (
            key, kernel, bias, needs_grad, [*self.parameters(), *self.buffers()])
        return kernel, bias

    # ------------------------------------------------------------------ forward
    def _conv(self, x: Tensor, weight: Tensor, row: int, col: int,
              bias: Tensor | None) -> Tensor:
        """Run a (kh, kw) kernel whose taps sit at (row, col) of the d×d window.

        The result has exactly the square conv's output size and alignment: the input is padded
        as the square conv pads it (any padding_mode), then cropped to the rows and columns
        this branch reads, so no extra output rows or columns reach the branch's BatchNorm.
        """
        top, bottom, left, right = self._pads
        if self.padding_mode != "zeros" and top + bottom + left + right > 0:
            x = F.pad(x, [left, right, top, bottom], mode=self.padding_mode)
            top, bottom, left, right = 0, 0, 0, 0
        h, w = x.shape[-2], x.shape[-1]
        if not isinstance(h, int) or not isinstance(w, int):
            # symbolic sizes (torch.export / dynamic shapes): no size-dependent plan
            return self._embedded_conv(x, weight, row, col, bias, (top, bottom, left, right))
        kh, kw = weight.shape[-2], weight.shape[-1]
        if torch.jit.is_scripting() or torch.compiler.is_compiling():
            plan = _branch_plan(self.kernel_size[0], self.stride, self.dilation,
                                (top, bottom, left, right), h, w, kh, kw, row, col)
        else:
            plan = self._cached_plan(h, w, (top, bottom, left, right), kh, kw, row, col)
        ah, bh, ph, eh0, eh1, aw, bw, pw, ew0, ew1 = plan
        if ah != 0 or aw != 0 or bh != h or bw != w:
            x = x[..., ah:bh, aw:bw]
        if ah == bh or aw == bw:  # the branch reads only padding (tiny inputs)
            x = x.new_zeros([x.shape[0], x.shape[1], bh - ah + eh0 + eh1, bw - aw + ew0 + ew1])
        elif eh0 + eh1 + ew0 + ew1 > 0:
            x = F.pad(x, [ew0, ew1, eh0, eh1])
        return F.conv2d(x, weight, bias, self.stride, (ph, pw), self.dilation, self.groups)

    @torch.jit.unused
    def _cached_plan(self, h: int, w: int, pads: tuple[int, int, int, int], kh: int, kw: int,
                     row: int, col: int) -> tuple[int, int, int, int, int, int, int, int, int, int]:
        """:func:`_branch_plan`, remembered (plain Python costs a few µs per branch and step)."""
        return _cached_branch_plan(self.kernel_size[0], self.stride, self.dilation, pads,
                                   h, w, kh, kw, row, col)

    def _embedded_conv(self, x: Tensor, weight: Tensor, row: int, col: int, bias: Tensor | None,
                       pads: tuple[int, int, int, int]) -> Tensor:
        """The branch as the square conv would run it, its kernel embedded in d×d (any size)."""
        d = self.kernel_size[0]
        kh, kw = weight.shape[-2], weight.shape[-1]
        if kh != d or kw != d:
            weight = F.pad(weight, [col, d - col - kw, row, d - row - kh])
        top, bottom, left, right = pads
        if top != bottom or left != right:
            x = F.pad(x, [left, right, top, bottom])
            top, left = 0, 0
        return F.conv2d(x, weight, bias, self.stride, (top, left), self.dilation, self.groups)

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
        if not self.training and self.fast_eval and not torch.jit.is_scripting():
            # eval mode: the BNs are affine maps, so the block is one conv with a bias
            fused = self._eval_weights()
            if fused is not None:
                return self._conv(x, fused[0], 0, 0, fused[1])
        if hasattr(self, "bn"):
            return self.bn(self._conv(x, self.merged_kernel(), 0, 0, None))
        else:
            return self._branch_sum(x)

    # ------------------------------------------------------------------ cache invalidation
    def train(self, mode: bool = True) -> ACBlock:
        self._fused_cache = None
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> ACBlock:
        self._fused_cache = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._fused_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fused_cache"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle, also blocks pickled by earlier versions (no scales, cache or taps)."""
        super().__setstate__(state)
        self.__dict__.setdefault("_fused_cache", None)
        self.__dict__.setdefault("branch_scale", False)
        if "fused_conv" not in self._modules:
            self.__dict__.setdefault("fused_conv", None)
            if "_taps" not in self._buffers:
                self._register_taps()

    # ------------------------------------------------------------------ fusion
    def fused_weights(self) -> tuple[Tensor, Tensor]:
        """(kernel, bias) of the equivalent conv, in float64, from the BN running statistics."""
        if self.is_fused:
            conv = self.fused_conv
            return conv.weight.detach().double(), conv.bias.detach().double()
        with torch.no_grad():
            return self._fold(torch.float64)

    def fuse(self) -> nn.Conv2d:
        """A new ``nn.Conv2d`` (with bias) computing this block's eval-mode function."""
        kernel, bias = self.fused_weights()
        conv = self.new_conv(bias=True)
        with torch.no_grad():
            conv.weight.copy_(kernel)
            conv.bias.copy_(bias)
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
        self._fused_cache = None
        self.fused_conv = fused


def _stack(bns: list[nn.BatchNorm2d], name: str, dtype: torch.dtype) -> Tensor | None:
    """One statistic or affine parameter of several BNs as a (B, C) tensor in ``dtype``.

    A BN without affine parameters counts as weight 1, bias 0 (None when no BN has them).
    """
    values = [getattr(bn, name) for bn in bns]
    if all(v is None for v in values):
        return None
    fill = 1.0 if name == "weight" else 0.0
    return torch.stack([torch.full_like(bns[0].running_var, fill) if v is None else v
                        for v in values]).to(dtype)


def _check_running_stats(bn: nn.BatchNorm2d) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fuse a BatchNorm2d with track_running_stats=False")


def _fold_module(kernel: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Fold an ``nn.BatchNorm2d``'s running statistics into ``kernel`` (in its dtype)."""
    _check_running_stats(bn)
    return fold_bn(kernel, None, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
