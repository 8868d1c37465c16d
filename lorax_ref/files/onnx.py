r"""The ONNX member of the checkpoint-reader family: graph weights under torch module names.

See :mod:`lorax_ref.files.checkpoints` for how initializers get their names and how int8 weights are dequantized.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .reader import Checkpoint, CheckpointError, natural_key

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
    """Longest dotted prefix shared by every parameter name (``"inner."``, ``"model.0.auto_model."``)."""
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
    """An ``.onnx`` file: MatMul/Gemm/Gather weights, dequantized when stored as int8, named like torch modules."""

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
        """(values, scale, zero_point) if ``tensor`` is an initializer or a dequantized initializer, else None."""
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
        """``/model/model.0/auto_model/encoder/layer.0/attention/self/query/MatMul`` → module path."""
        scope = [c for c in node.name.split("/") if c][:-1]  # drop the op's own name
        if not scope:
            return None  # flat names such as "node_MatMul_48" carry no module path
        joined = ".".join(scope)
        at = joined.find(self.prefix) if self.prefix else -1
        return joined[at + len(self.prefix):] if at >= 0 else joined  # drop export wrappers above the prefix

    def _name_from_bias(self, node) -> str | None:
        """The ``X.bias`` initializer added to the MatMul output (or Gemm's C input) names module ``X``."""
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
        return dict(sorted(weights.items(), key=lambda kv: natural_key(kv[0])))

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
        return sorted(list(self._weights) + list(self._named_params()), key=natural_key)

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

