"""Starting a run from trained weights: read a source, load it into the stock model, and decide
what to do with a classifier that does not fit (``acnet train --init-from SRC``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from .._files import CheckpointError
from .._text import first_line
from ..errors import InputError, NonFiniteError
from ..io import load_deployed
from .rundir import RunDir

log = logging.getLogger(__name__)

__all__ = ["add_conv_biases", "find_classifier", "load_source", "read_source"]

_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "net")
_ACB_KEYS = ("square_conv.weight", "hor_conv.weight", "ver_conv.weight")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _bad(src: str | Path, why: str) -> InputError:
    return InputError(f"init_from {src}: {why}", params=("init_from",))


def read_source(src: str | Path) -> dict[str, Tensor]:
    """The state_dict held by a run directory (its deployed weights), a deployed .safetensors,
    or a torch file (.pt/.pth/...) holding a state_dict, possibly under a 'state_dict'/'model'
    key and with DDP's 'module.' prefix."""
    path = Path(src)
    if not path.exists():
        raise _bad(src, "no such file or directory")
    if path.is_dir():
        run = RunDir(path)
        if not run.deployed_file.is_file():
            raise _bad(src, "a directory without deployed.safetensors (not a finished acnet "
                            "run)")
        path = run.deployed_file
    if path.suffix == ".safetensors":
        try:
            state = load_deployed(path)
        except CheckpointError as exc:
            raise CheckpointError(f"init_from: {exc}", params=("init_from",)) from exc
    elif path.suffix in _TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            if "unsupported global" in str(exc).lower():  # weights_only met a pickled class
                raise _bad(src, "holds pickled Python objects (a whole model?), which acnet "
                                "does not unpickle; save model.state_dict() instead") from exc
            raise CheckpointError(f"init_from {src}: not a readable torch file "
                                  f"({first_line(exc, 100)})", params=("init_from",)) from exc
    else:
        raise _bad(src, f"expected a run directory, .safetensors or "
                        f"{'/'.join(_TORCH_SUFFIXES)} file, got {path.suffix or 'no suffix'}")
    return _state_dict(state, src)


def _state_dict(obj: object, src: str | Path) -> dict[str, Tensor]:
    """The tensors of a loaded file as a flat state_dict, or a clear error."""
    for _ in range(2):  # {"state_dict": {...}} or {"model": {"state_dict": ...}}
        if isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise _bad(src, "holds no state_dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    if any(k.endswith(_ACB_KEYS) for k in obj):
        raise _bad(src, "holds ACBlock weights (an acnet training checkpoint); pass its run "
                        "directory, or deploy it first (acnet deploy RUN)")
    bad = sum(int((~torch.isfinite(t)).sum()) for t in obj.values() if t.is_floating_point())
    if bad:
        raise NonFiniteError(f"init_from {src}: {bad} weights are not finite (NaN or infinity)",
                             params=("init_from",))
    return obj


def find_classifier(model: nn.Module, num_classes: int) -> str | None:
    """The name of the model's classifier: its last Linear (or 1×1 conv) with ``num_classes``
    outputs, or None."""
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.out_features == num_classes:
            found = name
        elif (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
              and m.out_channels == num_classes):
            found = name
    return found


def add_conv_biases(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Give a bias to each conv whose weights in ``state`` have one (``bias-added`` in deploy's
    report: a conv with neither bias nor BN after it, e.g. DenseNet's), so a strict load works."""
    for name, m in model.named_modules():
        key = f"{name}.bias" if name else "bias"
        if isinstance(m, nn.Conv2d) and m.bias is None and key in state:
            m.bias = nn.Parameter(torch.zeros(m.out_channels, dtype=m.weight.dtype,
                                              device=m.weight.device))


def _listed(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_source(model: nn.Module, state: dict[str, Tensor], *, num_classes: int,
                new_head: bool = False, src: str | Path = "the source") -> list[str]:
    """Load ``state`` into the stock ``model`` strictly, except its classifier: kept as freshly
    initialised when its shape does not fit (or with ``new_head``). Returns notes to log."""
    add_conv_biases(model, state)
    own = model.state_dict()
    head = find_classifier(model, num_classes)
    in_head = (lambda k: head is not None and k.startswith(f"{head}."))  # noqa: E731
    skip = lambda k: k.endswith("num_batches_tracked")  # noqa: E731 frozen norms drop it
    missing = [k for k in own if k not in state and not skip(k)]
    unexpected = [k for k in state if k not in own and not skip(k)]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    notes = []
    head_keys = [k for k in own if in_head(k)]
    if (new_head or (wrong and all(in_head(k) for k in wrong))) and head_keys:
        old = state.get(head_keys[0])
        what = "as asked (new_head)" if new_head and not wrong else (
            f"the source has {old.shape[0] if old is not None else '?'} outputs, this run "
            f"{num_classes} classes")
        notes.append(f"init_from: classifier {head!r} re-initialised ({what})")
        state = {k: v for k, v in state.items() if not in_head(k)}
        missing = [k for k in missing if not in_head(k)]
        wrong = [k for k in wrong if not in_head(k)]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} ({_listed(v)})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong))
                 if v]
        raise _bad(src, "does not hold this model's weights: " + "; ".join(parts))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return notes
