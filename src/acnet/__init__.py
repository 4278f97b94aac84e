"""acnet: Asymmetric Convolution Blocks (ACNet, Ding et al., ICCV 2019) for any PyTorch CNN.

Train with ACBlocks, ship the original architecture: ``convert`` → train → ``deploy``.
"""

from ._version import __version__
from .block import ACBlock
from .convert import AbsorbedBatchNorm, ConversionReport, convert
from .deploy import NormActTail, deploy
from .export import ExportMismatchError, export_onnx
from .fusion import embed_kernel, fold_bn
from .io import load_deployed, save_deployed
from .norms import FrozenBatchNorm2d
from .options import ACBOptions

__all__ = [
    "ACBOptions",
    "ACBlock",
    "AbsorbedBatchNorm",
    "ConversionReport",
    "ExportMismatchError",
    "FrozenBatchNorm2d",
    "NormActTail",
    "__version__",
    "convert",
    "deploy",
    "embed_kernel",
    "export_onnx",
    "fold_bn",
    "load_deployed",
    "save_deployed",
]
