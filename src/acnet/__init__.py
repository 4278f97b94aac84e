"""acnet: Asymmetric Convolution Blocks (ACNet, Ding et al., ICCV 2019) for any PyTorch CNN."""

from .block import ACBlock
from .convert import AbsorbedBatchNorm, ConversionReport, convert, deploy
from .export import ExportMismatchError, export_onnx
from .fusion import embed_kernel, fold_bn
from .io import load_checkpoint, load_deployed, save_checkpoint, save_deployed

__version__ = "0.1.0"

__all__ = [
    "ACBlock",
    "AbsorbedBatchNorm",
    "ConversionReport",
    "ExportMismatchError",
    "convert",
    "deploy",
    "embed_kernel",
    "export_onnx",
    "fold_bn",
    "load_checkpoint",
    "load_deployed",
    "save_checkpoint",
    "save_deployed",
    "__version__",
]
