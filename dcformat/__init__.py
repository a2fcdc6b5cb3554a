"""dcz: Deep Compression for ONNX models.

Pruning, per-tensor codebooks, relative-index sparse positions and canonical Huffman
coding, stored in the documented .dcz container (``spec/format.md``).

High level (ONNX in, ONNX out)::

    import dcformat
    result = dcformat.compress("model.onnx", "model.dcz", dcformat.Policy(bits={"*": 8}), check=True)
    model = dcformat.load("model.dcz")            # onnx.ModelProto
    dcformat.decompress("model.dcz", "rebuilt.onnx")

Low level (any named tensors)::

    dcformat.write_dcz(path, [dcformat.TensorInput("w", array, dcformat.CompressSettings(bits=5))])
    contents = dcformat.read_dcz(path)
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    ChecksumError,
    CorruptError,
    DczError,
    InputError,
    LimitError,
    TruncatedError,
    UnsupportedError,
)
from .codec import CompressSettings, TensorInput, decode_tensor, encode_tensor, read_dcz, write_dcz  # noqa: E402
from .container import ReadLimits, open_dcz  # noqa: E402
from .select import Policy  # noqa: E402
from .api import CompressResult, compress, decompress, load  # noqa: E402
from .report import breakdown  # noqa: E402

__all__ = [
    "__version__",
    "DczError", "TruncatedError", "CorruptError", "ChecksumError", "UnsupportedError", "LimitError", "InputError",
    "CompressSettings", "TensorInput", "encode_tensor", "decode_tensor", "write_dcz", "read_dcz",
    "ReadLimits", "open_dcz", "Policy", "CompressResult", "compress", "decompress", "load", "breakdown",
]
