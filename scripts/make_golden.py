"""Write the golden cases of the conformance kit: lorax_ref/data/golden/lorax_golden_v1.json.

Small float64 inputs and the outputs of the reference functions (lorax_ref.EQUATIONS), per equation
label, in plain JSON so that a port in any language can check itself (format: the README.md next to
the file). Inputs are seeded and built from explicit spectra with well separated singular values, so
every top-r subspace is well defined and a port's own SVD finds the same one.

    python scripts/make_golden.py            # rewrite the file
    python scripts/make_golden.py --check    # exit 1 if the committed file differs from a fresh run

Version 1 is frozen once committed: a change of inputs, outputs or format is a new file (v2) so that
ports pinned to v1 keep working.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import lorax_ref as L
from lorax_ref.registry import EQUATIONS, slug
from lorax_ref.testing.oracles import np64 as N
from lorax_ref.testing.oracles import orthonormal, t64

OUT = Path(__file__).resolve().parents[1] / "lorax_ref" / "data" / "golden" / "lorax_golden_v1.json"
SEED = 20250116  # arXiv 2501.16559
RTOL, ATOL = 1e-9, 1e-12
RTOL_SVD = 1e-7  # Layer transfer: the port computes its own SVD


def T(x: np.ndarray) -> torch.Tensor:
    return t64(x, "cpu")  # the reference's outputs are computed on the CPU, whatever LORAX_DEVICE says


class Maker:
    """Seeded inputs: weights from explicit spectra, bases from the reference's svd_topk."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def weight(self, m: int, n: int) -> np.ndarray:
        k = min(m, n)
        s = 3.0 * 0.6 ** np.arange(k)  # (k,) ratio 0.6 between neighbours: subspaces well separated
        return (orthonormal(self.rng, m, k) * s) @ orthonormal(self.rng, n, k).T  # (m, n)

    def near(self, W: np.ndarray, eps: float = 0.05) -> np.ndarray:
        return W + eps * self.rng.standard_normal(W.shape)  # a "fine-tuned" target

    def bases(self, W: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
        U, _, V = L.svd_topk(T(W), r)
        return N(U), N(V)

    def normal(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class Cases(dict):
    """``{label: [case, ...]}`` for every label of the registry; :meth:`add` appends one case."""

    def __init__(self):
        super().__init__({label: [] for label in EQUATIONS})

    def add(self, label, name, note, inputs, outputs=None, raises=None, info=None):
        case = {"name": name, "note": note, "inputs": inputs}
        if raises:
            case["raises"] = raises
        else:
            case["outputs"] = outputs
        if info:
            case["info"] = info
        self[label].append(case)


def _eq1_cases(mk: Maker, add) -> None:
    """Eq. (1)."""
    for name, (m, n, r, full) in {"diag-4x3-r2": (4, 3, 2, False), "full-3x3-r2": (3, 3, 2, True),
                                  "diag-5x2-r1": (5, 2, 1, False)}.items():
        U_s, V_s = mk.bases(mk.weight(m, n), r)
        d = mk.normal(r, r) if full else mk.normal(r)
        add("Eq. (1)", name, "ΔΣ_s " + ("full (r, r)" if full else "diagonal (r,)"),
            dict(U_s=U_s, dSigma_s=d, V_s=V_s), dict(dW_s=L.lorax_delta(T(U_s), T(d), T(V_s))))


def _eq2_cases(mk: Maker, add) -> None:
    """Eq. (2)."""
    for name, (m, n, r, lorax) in {"generic-4x3-r2": (4, 3, 2, False), "lorax-fixed-point-3x3-r2": (3, 3, 2, True),
                                   "generic-2x5-r1": (2, 5, 1, False)}.items():
        U, V = mk.bases(mk.weight(m, n), r)
        dW = N(L.lorax_delta(T(U), T(mk.normal(r)), T(V))) if lorax else mk.normal(m, n)
        add("Eq. (2)", name, "a LoRA-X update: returned unchanged" if lorax else "a generic ΔW",
            dict(dW=dW, U=U, V=V), dict(dW=L.project(T(dW), T(U), T(V))))


def _eq3_cases(mk: Maker, add) -> None:
    """Eq. (3), projection form (and one other-shape case that must raise)."""
    for name, (m, n, r, target, lorax) in {"independent-4x3-r2-lorax": (4, 3, 2, "independent", True),
                                           "near-3x3-r2-generic": (3, 3, 2, "near", False),
                                           "independent-4x4-r2-generic": (4, 4, 2, "independent", False)}.items():
        W_s = mk.weight(m, n)
        W_t = mk.near(W_s) if target == "near" else mk.weight(m, n)
        U_s, V_s = mk.bases(W_s, r)
        U_t, V_t = mk.bases(W_t, r)
        dW_s = N(L.lorax_delta(T(U_s), T(mk.normal(r)), T(V_s))) if lorax else mk.normal(m, n)
        add("Eq. (3)", name, f"{target} target, " + ("LoRA-X ΔW_s" if lorax else "generic ΔW_s"),
            dict(dW_s=dW_s, U_t=U_t, V_t=V_t), dict(dW_t=L.transfer_same_dim(T(dW_s), T(U_t), T(V_t))))
    U_t, V_t = mk.bases(mk.weight(4, 3), 2)
    add("Eq. (3)", "other-shape-raises", "ΔW_s is 3×4 but the target layer is 4×3: must raise, never pad or crop",
        dict(dW_s=mk.normal(3, 4), U_t=U_t, V_t=V_t), raises="shape mismatch")


def _eq3_rotation_cases(mk: Maker, add) -> None:
    """Eq. (3) rotation form."""
    for name, (m, n, r, target, full) in {"independent-4x3-r2-diag": (4, 3, 2, "independent", False),
                                          "near-3x3-r2-full": (3, 3, 2, "near", True),
                                          "independent-4x4-r3-diag": (4, 4, 3, "independent", False)}.items():
        W_s = mk.weight(m, n)
        W_t = mk.near(W_s) if target == "near" else mk.weight(m, n)
        U_s, V_s = mk.bases(W_s, r)
        U_t, V_t = mk.bases(W_t, r)
        d = mk.normal(r, r) if full else mk.normal(r)
        add("Eq. (3) rotation form", name, f"{target} target, ΔΣ_s " + ("full" if full else "diagonal"),
            dict(U_t=U_t, U_s=U_s, dSigma_s=d, V_s=V_s, V_t=V_t),
            dict(dSigma_ts=L.transferred_sigma(T(U_t), T(U_s), T(d), T(V_s), T(V_t))))


def _eq3_lowrank_cases(mk: Maker, add) -> None:
    """Eq. (3) low-rank form."""
    for name, (m, n, r, k) in {"4x3-r2-k2": (4, 3, 2, 2), "3x3-r1-k2": (3, 3, 1, 2)}.items():
        U_t, V_t = mk.bases(mk.weight(m, n), r)
        B, A = mk.normal(m, k), mk.normal(k, n)
        B_t, A_t = L.transfer_lora(T(B), T(A), T(U_t), T(V_t))
        add("Eq. (3) low-rank form", name, "plain LoRA ΔW = B A (any α/r scaling stays with the caller)",
            dict(B=B, A=A, U_t=U_t, V_t=V_t), dict(B_t=B_t, A_t=A_t))


def _table5_cases(mk: Maker, add) -> None:
    """Table 5 ablation."""
    for name, (m, n, r, full) in {"4x3-r2-diag": (4, 3, 2, False), "3x5-r2-full": (3, 5, 2, True)}.items():
        U_t, V_t = mk.bases(mk.weight(m, n), r)
        d = mk.normal(r, r) if full else mk.normal(r)
        add("Table 5 ablation", name, "copy ΔΣ_s into the target bases without rotation",
            dict(U_t=U_t, dSigma_s=d, V_t=V_t), dict(dW_copy=L.copy_sigma_transfer(T(U_t), T(d), T(V_t))))


def _alignment_maps_cases(mk: Maker, add) -> None:
    """§4.2.2 alignment maps."""
    for name, (ms, ns, mt, nt, r) in {"4x3-to-5x2-r2": (4, 3, 5, 2, 2), "3x3-to-3x3-r2": (3, 3, 3, 3, 2),
                                      "2x4-to-4x3-r1": (2, 4, 4, 3, 1)}.items():
        U_s, V_s = mk.bases(mk.weight(ms, ns), r)
        U_t, V_t = mk.bases(mk.weight(mt, nt), r)
        P, Q = L.alignment_maps(T(U_s), T(V_s), T(U_t), T(V_t))
        add("§4.2.2 alignment maps", name, "minimum-norm least-squares maps",
            dict(U_s=U_s, V_s=V_s, U_t=U_t, V_t=V_t), dict(P=P, Q=Q))


def _mismatch_cases(mk: Maker, add) -> None:
    """§4.2.2, the transfer between layers of different shapes."""
    for name, (ms, ns, mt, nt, r, lorax) in {"4x3-to-5x2-r2-lorax": (4, 3, 5, 2, 2, True),
                                             "3x3-to-3x3-r2-generic": (3, 3, 3, 3, 2, False),
                                             "5x4-to-3x3-r2-generic": (5, 4, 3, 3, 2, False)}.items():
        U_s, V_s = mk.bases(mk.weight(ms, ns), r)
        U_t, V_t = mk.bases(mk.weight(mt, nt), r)
        dW_s = N(L.lorax_delta(T(U_s), T(mk.normal(r)), T(V_s))) if lorax else mk.normal(ms, ns)
        add("§4.2.2", name, ("LoRA-X ΔW_s" if lorax else "generic ΔW_s") + " (the rule is not Eq. (3) at equal shapes)",
            dict(dW_s=dW_s, U_s=U_s, V_s=V_s, U_t=U_t, V_t=V_t),
            dict(dW_t=L.transfer_mismatch(T(dW_s), T(U_s), T(V_s), T(U_t), T(V_t))))


def _eq4_cases(mk: Maker, add) -> None:
    """Eq. (4)."""
    for name, (m, r, target) in {"independent-m4-r2": (4, 2, "independent"), "near-m5-r3": (5, 3, "near"),
                                 "identical-m4-r2": (4, 2, "same"), "r-equals-m-3": (3, 3, "independent")}.items():
        W_a = mk.weight(m, m)
        W_b = {"near": mk.near(W_a), "same": W_a}.get(target, None)
        W_b = mk.weight(m, m) if W_b is None else W_b
        U_a, _ = mk.bases(W_a, r)
        U_b, _ = mk.bases(W_b, r)
        note = {"same": "identical subspaces: Φ = 1", "near": "a fine-tuned target",
                "independent": "unrelated subspaces" + (" — r = m: Φ = 1 whatever the weights" if r == m else "")}[target]
        add("Eq. (4)", name, note, dict(U_a=U_a, U_b=U_b), dict(phi=L.subspace_similarity(T(U_a), T(U_b))))


def _layer_transfer_cases(mk: Maker, add) -> None:
    """Layer transfer (auto method, no gate)."""
    for name, (ms, ns, mt, nt, r, target, kind) in {
        "independent-4x4-r2-lorax": (4, 4, 4, 4, 2, "independent", "lorax"),
        "near-5x3-r2-generic": (5, 3, 5, 3, 2, "near", "generic"),
        "same-3x3-r2-lorax": (3, 3, 3, 3, 2, "same", "lorax"),
        "4x3-to-5x2-r2-lorax-diagonal": (4, 3, 5, 2, 2, "independent", "lorax"),
    }.items():
        W_s = mk.weight(ms, ns)
        W_t = {"near": lambda: mk.near(W_s), "same": lambda: W_s.copy()}.get(target, lambda: mk.weight(mt, nt))()
        U_s, V_s = mk.bases(W_s, r)
        dW_s = N(L.lorax_delta(T(U_s), T(mk.normal(r)), T(V_s))) if kind == "lorax" else mk.normal(ms, ns)
        dW_t, report = L.transfer_layer(T(dW_s), T(W_s), T(W_t), r)
        info = {k: report.as_dict()[k] for k in ("case", "phi_u", "phi_v", "kept_energy")}
        note = (f"{target} target, " + ("LoRA-X ΔW_s (diagonal ΔΣ_s: sign-convention free)" if kind == "lorax" else "generic ΔW_s"))
        add("Layer transfer", name, note, dict(dW_s=dW_s, W_s=W_s, W_t=W_t, r=r), dict(dW_t=dW_t), info=info)


# In this order: every builder draws from one seeded generator, so the order fixes the inputs.
BUILDERS = (_eq1_cases, _eq2_cases, _eq3_cases, _eq3_rotation_cases, _eq3_lowrank_cases, _table5_cases,
            _alignment_maps_cases, _mismatch_cases, _eq4_cases, _layer_transfer_cases)


def build() -> dict:
    """Every golden case (the builders above, in order) and the file's header."""
    mk, cases = Maker(SEED), Cases()
    for builder in BUILDERS:
        builder(mk, cases.add)
    return document(cases)


def document(eqs: dict[str, list[dict]]) -> dict:
    """The golden file: format, layout, tolerances and, per label, its signature and cases."""
    return {
        "format": "lorax_ref golden cases",
        "version": 1,
        "generated_by": "scripts/make_golden.py",
        "lorax_ref_version": L.__version__,
        "seed": SEED,
        "dtype": "float64",
        "layout": "matrices are row-major nested lists [[row 0], [row 1], ...]; vectors are flat lists; "
                  "U (m, r) and V (n, r) are column bases (V, never Vh); weights are (out, in) = nn.Linear layout",
        "tolerance": {"rtol": RTOL, "atol": ATOL,
                      "rule": "max_ij |observed_ij - expected_ij| <= atol + rtol * max_ij |expected_ij|, per output"},
        "equations": {
            label: {
                "slug": slug(label),
                "reference": f"lorax_ref.{func.__name__}",
                "args": list(SIGNATURE_ARGS[label]),
                "outputs": list(SIGNATURE_OUTPUTS[label]),
                **({"tolerance": {"rtol": RTOL_SVD}} if label == "Layer transfer" else {}),
                "cases": eqs[label],
            }
            for label, func in EQUATIONS.items()
        },
    }


def _specs():
    from lorax_ref.conformance import SPECS

    return {k: s.args for k, s in SPECS.items()}, {k: s.outputs for k, s in SPECS.items()}


SIGNATURE_ARGS, SIGNATURE_OUTPUTS = _specs()


def _jsonable(x):
    """Tensors/arrays -> nested lists of Python floats (shortest round-trip repr), recursively."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        x = N(x)
    if isinstance(x, np.ndarray):
        return x.astype(np.float64).tolist()
    if isinstance(x, (np.floating, float)):
        return float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def dumps(data: dict) -> str:
    """Indented JSON with each matrix row on one line (readable diffs, small file)."""
    placeholders: dict[str, str] = {}

    def pack(x):
        if isinstance(x, dict):
            return {k: pack(v) for k, v in x.items()}
        if isinstance(x, list) and x and all(isinstance(v, (int, float)) for v in x):
            key = f"@@{len(placeholders)}@@"
            placeholders[key] = json.dumps(x)
            return key
        if isinstance(x, list) and x and all(isinstance(v, list) and v and all(isinstance(w, (int, float)) for w in v) for v in x):
            key = f"@@{len(placeholders)}@@"
            placeholders[key] = "[" + ", ".join(json.dumps(v) for v in x) + "]"
            return key
        if isinstance(x, list):
            return [pack(v) for v in x]
        return x

    text = json.dumps(pack(data), indent=1, ensure_ascii=False)
    for key, value in placeholders.items():
        text = text.replace(f'"{key}"', value)
    return text + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the committed file instead of writing it")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    data = _jsonable(build())
    if args.check:
        old = json.loads(args.out.read_text())
        problems = compare(old, data)
        for p in problems:
            print(p)
        print("golden file is up to date" if not problems else f"{len(problems)} differences")
        return 1 if problems else 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dumps(data))
    n = sum(len(e["cases"]) for e in data["equations"].values())
    print(f"wrote {n} cases for {len(data['equations'])} equations to {args.out} ({args.out.stat().st_size} bytes)")
    return 0


def compare(old: dict, new: dict, rtol: float = 1e-12) -> list[str]:
    """Differences between two golden files beyond last-bit noise (different LAPACK builds)."""
    problems = []

    def walk(a, b, where):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if k not in a or k not in b:
                    problems.append(f"{where}/{k}: only in {'new' if k in b else 'committed'} file")
                else:
                    walk(a[k], b[k], f"{where}/{k}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            try:
                A, B = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            except (TypeError, ValueError):
                for i, (x, y) in enumerate(zip(a, b)):
                    walk(x, y, f"{where}[{i}]")
                return
            if A.shape != B.shape or np.max(np.abs(A - B), initial=0.0) > rtol * max(1.0, np.max(np.abs(B), initial=0.0)):
                problems.append(f"{where}: values differ")
        elif isinstance(a, float) and isinstance(b, float):
            if abs(a - b) > rtol * max(1.0, abs(b)):
                problems.append(f"{where}: {a!r} != {b!r}")
        elif a != b and not (where.endswith("lorax_ref_version")):
            problems.append(f"{where}: {a!r} != {b!r}")

    walk(old, new, "")
    return problems


if __name__ == "__main__":
    sys.exit(main())
