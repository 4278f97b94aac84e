"""acnet: Asymmetric Convolution Blocks (ACNet, Ding et al., ICCV 2019) for any PyTorch CNN."""

from .block import ACBlock
from .fusion import embed_kernel, fold_bn

__version__ = "0.1.0"

__all__ = ["ACBlock", "fold_bn", "embed_kernel", "__version__"]
