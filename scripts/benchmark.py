#!/usr/bin/env python
r"""Benchmark of the fast LoRA-X transfer (lorax_ref.fast) against the straightforward float64 loop.

What is measured, in one process so that every ratio compares runs on the same machine at the same time
(the reference and the fast path alternate chunk by chunk, so load changes hit both):

* **loop** — the straightforward implementation of the equations, per layer: ``svd_topk`` (a full float64
  SVD) of the source and of the target, Eq. (1) ``lorax_delta``, Eq. (3) ``transfer_same_dim``;
* **fast** — ``lorax_ref.fast``: certified bases of the same-shaped layers of a chunk, batched, then
  ΔΣ_{t←s}, its certified bound (a layer over 1e-6 is recomputed with the reference) and the dense ΔW_{t←s};
* **cached** — a second adapter on the same base pair, bases kept in memory (``LayerPair``): dense ΔW_{t←s}
  (``cached``) and the compact r×r ΔΣ_{t←s} (``cached_compact``);
* **floor** — one ``W @ Ω`` pass with r columns (float64), the cost of touching W once;
* the largest relative deviation ‖ΔW_fast − ΔW_ref‖_F/‖ΔW_ref‖_F (first and second adapter), the largest
  certified bound, fallbacks, and peak resident memory (VmHWM reset per section; CUDA: max allocated).

Layers: synthetic weights with the measured MiniLM singular-value profile and Wigner-surmise spacings
(``lorax_ref.fast.synthetic_pair``), stored in float32 like real checkpoints; target = source + 10 %
Gaussian change (a fine-tune). Shapes are those of the attention projections ``to_q, to_k, to_v,
to_out.0`` of ``attn1`` and ``attn2`` in the SD-1.5 UNet (16 transformer blocks, widths 320/640/1280,
cross-attention inputs 768) and the SDXL UNet (70 blocks, widths 640/1280, cross-attention inputs 2048).

Usage::

    python scripts/benchmark.py --quick                 # a few minutes: subset of layers, small scaling sweep
    python scripts/benchmark.py --models sd15 sdxl --subset 8 --out results.json
    python scripts/benchmark.py --stream --stream-gb 2.2   # + streaming test from a ≥2 GB checkpoint
    python scripts/benchmark.py --models sdxl           # the whole SDXL UNet (long on 2 cores)

``--subset N`` times at most N layers per shape group and extrapolates the model totals from the
per-layer means (the JSON says so). The JSON (``--out``) holds every number printed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import struct
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch

from lorax_ref import fast, lorax_delta, svd_topk, transfer_same_dim
from lorax_ref.files.checkpoints import open_checkpoint
from lorax_ref.files.stream import _trim_heap, stream_transfer

# ----------------------------------------------------------------------------------------------------------
# Layer inventories (diffusers names; weight layout (out, in))
# ----------------------------------------------------------------------------------------------------------


def _block_layers(prefix: str, d: int, cross: int) -> list[tuple[str, tuple[int, int]]]:
    """The 8 attention projections of one transformer block of width d."""
    out = []
    for attn in ("attn1", "attn2"):
        kv_in = d if attn == "attn1" else cross
        out += [
            (f"{prefix}.{attn}.to_q.weight", (d, d)),
            (f"{prefix}.{attn}.to_k.weight", (d, kv_in)),
            (f"{prefix}.{attn}.to_v.weight", (d, kv_in)),
            (f"{prefix}.{attn}.to_out.0.weight", (d, d)),
        ]
    return out


def sd15_layers() -> list[tuple[str, tuple[int, int]]]:
    """SD-1.5 UNet: 16 transformer blocks (down 2×320, 2×640, 2×1280; mid 1×1280; up 3×1280, 3×640, 3×320)."""
    layers = []
    for i, d in enumerate((320, 640, 1280)):
        for a in range(2):
            layers += _block_layers(f"down_blocks.{i}.attentions.{a}.transformer_blocks.0", d, 768)
    layers += _block_layers("mid_block.attentions.0.transformer_blocks.0", 1280, 768)
    for i, d in zip((1, 2, 3), (1280, 640, 320)):
        for a in range(3):
            layers += _block_layers(f"up_blocks.{i}.attentions.{a}.transformer_blocks.0", d, 768)
    return layers


def sdxl_layers() -> list[tuple[str, tuple[int, int]]]:
    """SDXL UNet: 70 transformer blocks (down 2×2 @640, 2×10 @1280; mid 10 @1280; up 3×10 @1280, 3×2 @640)."""
    layers = []
    for i, d, depth, n_att in ((1, 640, 2, 2), (2, 1280, 10, 2)):
        for a in range(n_att):
            for t in range(depth):
                layers += _block_layers(f"down_blocks.{i}.attentions.{a}.transformer_blocks.{t}", d, 2048)
    for t in range(10):
        layers += _block_layers(f"mid_block.attentions.0.transformer_blocks.{t}", 1280, 2048)
    for i, d, depth in ((0, 1280, 10), (1, 640, 2)):
        for a in range(3):
            for t in range(depth):
                layers += _block_layers(f"up_blocks.{i}.attentions.{a}.transformer_blocks.{t}", d, 2048)
    return layers


MODELS = {"sd15": sd15_layers, "sdxl": sdxl_layers}


def shape_groups(layers) -> OrderedDict[tuple[int, int], int]:
    groups: OrderedDict = OrderedDict()
    for _, shape in layers:
        groups[shape] = groups.get(shape, 0) + 1
    return groups


# ----------------------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Reset the peak-memory counter: VmHWM via /proc/self/clear_refs (Linux), CUDA allocator stats.

    On CPU the freed heap is handed back first (``malloc_trim``), so the peak is that of the section,
    not of what earlier sections left in glibc's free lists.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    def __init__(self, device):
        self.device = device
        self.total = 0.0

    def __enter__(self):
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.total += time.perf_counter() - self.t0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------------
# One shape group
# ----------------------------------------------------------------------------------------------------------


def make_chunk(shape, count, gen, bases_pool, device):
    """``count`` synthetic (W_s, W_t) pairs (float32, like a checkpoint) + two adapters each."""
    m, n = shape
    pairs = [fast.synthetic_pair(m, n, gen, bases=bases_pool) for _ in range(count)]
    W_s = [p[0].float().to(device) for p in pairs]
    W_t = [p[1].float().to(device) for p in pairs]
    return W_s, W_t


def run_group(shape, count, n_timed, r, args, device, gen):
    """Time the loop, the fast path, the cached path and the floor on ``n_timed`` layers of one shape."""
    m, n = shape
    k0 = min(m, n)
    pool = (fast.haar_basis(m, k0, gen), fast.haar_basis(n, k0, gen))  # reused with permutations + signs
    t_loop, t_fast, t_cached, t_factored, t_compact, t_floor = (Timer(device) for _ in range(6))
    dev1 = dev2 = bound_max = 0.0
    methods: dict[str, int] = {}
    peak_loop = peak_fast = 0.0
    done = 0
    chunk = args.chunk if device.type == "cpu" else args.gpu_chunk
    while done < n_timed:
        b = min(chunk, n_timed - done)
        W_s, W_t = make_chunk(shape, b, gen, pool, device)
        d1 = [torch.randn(r, generator=gen, dtype=torch.float64).to(device) for _ in range(b)]
        d2 = [torch.randn(r, generator=gen, dtype=torch.float64).to(device) for _ in range(b)]

        # the straightforward loop (reference, float64)
        refs, ref_bases = [], []
        reset_peak(device)
        with t_loop:
            for ws, wt, d in zip(W_s, W_t, d1):
                U_s, _, V_s = svd_topk(ws.double(), r)  # full float64 SVD  (m, r), (n, r)
                U_t, _, V_t = svd_topk(wt.double(), r)
                refs.append(transfer_same_dim(lorax_delta(U_s, d, V_s), U_t, V_t))  # Eq. (1), Eq. (3)
                ref_bases.append((U_s, V_s, U_t, V_t))
        peak_loop = max(peak_loop, peak_mb(device))

        # fast path, bases computed (batched over the chunk), dense ΔW_t with certified bound
        reset_peak(device)
        outs = []
        with t_fast:
            pairs = fast.pair_bases_group(W_s, W_t, r, method=args.method)
            for i, (pair, d) in enumerate(zip(pairs, d1)):
                dW, pair, bound = fast.transfer_fast(W_s[i], W_t[i], d, r, pair=pair)
                pairs[i] = pair
                outs.append((dW, bound))
        peak_fast = max(peak_fast, peak_mb(device))
        for (dW, bound), ref, pair in zip(outs, refs, pairs):
            dev1 = max(dev1, rel(dW, ref))
            bound_max = max(bound_max, bound)
            key = pair.source.cert.method + "/" + pair.target.cert.method
            methods[key] = methods.get(key, 0) + 1
        del outs, refs

        # second adapter, cached bases: dense ΔW, LoRA factors (B, A) with BA = ΔW, compact ΔΣ
        with t_cached:
            dense2 = [pair.delta_w(d) for pair, d in zip(pairs, d2)]
        with t_factored:
            factored2 = [pair.factors(d) for pair, d in zip(pairs, d2)]
        with t_compact:
            compact2 = [pair.dsigma_ts(d) for pair, d in zip(pairs, d2)]
        for pair, dW2, (B2, A2), ts2, d, (U_s, V_s, U_t, V_t) in zip(pairs, dense2, factored2, compact2, d2, ref_bases):
            ref2 = transfer_same_dim(lorax_delta(U_s, d, V_s), U_t, V_t)
            dev2 = max(dev2, rel(dW2, ref2), rel(B2 @ A2, ref2))
            bound_max = max(bound_max, pair.bound(d, ts2))
        del dense2, factored2, compact2

        # the floor: one pass W @ Ω with r columns (float64)
        Om = torch.randn(n, r, generator=gen, dtype=torch.float64).to(device)
        W64 = [w.double() for w in W_s]
        with t_floor:
            for w in W64:
                w @ Om  # (m, n) @ (n, r)
        done += b
    per = lambda t: t.total / n_timed
    return {
        "shape": list(shape), "r": r, "count": count, "timed": n_timed,
        "loop_s_per_layer": per(t_loop), "fast_s_per_layer": per(t_fast),
        "cached_s_per_layer": per(t_cached), "cached_factored_s_per_layer": per(t_factored),
        "cached_compact_s_per_layer": per(t_compact),
        "floor_s_per_layer": per(t_floor),
        "ratio_fast": t_loop.total / t_fast.total, "ratio_cached": t_loop.total / t_cached.total,
        "ratio_cached_factored": t_loop.total / max(t_factored.total, 1e-9),
        "ratio_cached_compact": t_loop.total / max(t_compact.total, 1e-9),
        "fast_in_floors": t_fast.total / t_floor.total, "cached_in_floors": t_cached.total / t_floor.total,
        "max_rel_dev_first": dev1, "max_rel_dev_second": dev2, "max_bound": bound_max,
        "methods": methods, "peak_mb_loop": round(peak_loop, 1), "peak_mb_fast": round(peak_fast, 1),
    }


def subset_for(spec, model: str) -> int | None:
    """``--subset 8`` → 8 for every model; ``--subset sdxl=8`` → 8 for SDXL, everything for the others."""
    if not spec:
        return None
    limit = None
    for item in spec:
        key, _, val = str(item).rpartition("=")
        if key in ("", model):
            limit = int(val)
    return limit


def run_model(name, r, args, device, gen):
    layers = MODELS[name]()
    groups = shape_groups(layers)
    rows = []
    for shape, count in groups.items():
        if r > min(shape):
            continue
        limit = subset_for(args.subset, name)
        n_timed = count if limit is None else min(count, limit)
        row = run_group(shape, count, n_timed, r, args, device, gen)
        rows.append(row)
        print(f"  {name} r={r:<4d} {shape!s:>13s} x{count:<4d} (timed {n_timed:>3d}) "
              f"loop {row['loop_s_per_layer']*1e3:8.1f} ms  fast {row['fast_s_per_layer']*1e3:7.1f} ms "
              f"({row['ratio_fast']:5.1f}x)  cached {row['cached_s_per_layer']*1e3:6.2f} ms ({row['ratio_cached']:6.1f}x) "
              f"factors {row['cached_factored_s_per_layer']*1e6:6.0f} us  compact {row['cached_compact_s_per_layer']*1e6:6.0f} us  floor {row['floor_s_per_layer']*1e3:6.2f} ms  "
              f"dev {row['max_rel_dev_first']:.1e}/{row['max_rel_dev_second']:.1e} bound {row['max_bound']:.1e} "
              f"peak {row['peak_mb_loop']:.0f}/{row['peak_mb_fast']:.0f} MB  {row['methods']}", flush=True)
    tot = {key: sum(row[f"{key}_s_per_layer"] * row["count"] for row in rows)
           for key in ("loop", "fast", "cached", "cached_factored", "cached_compact", "floor")}
    summary = {
        "model": name, "r": r, "layers": sum(row["count"] for row in rows),
        "timed_layers": sum(row["timed"] for row in rows),
        "extrapolated": any(row["timed"] < row["count"] for row in rows),
        "total_s": tot,
        "ratio_fast": tot["loop"] / tot["fast"], "ratio_cached": tot["loop"] / tot["cached"],
        "ratio_cached_factored": tot["loop"] / max(tot["cached_factored"], 1e-9),
        "ratio_cached_compact": tot["loop"] / max(tot["cached_compact"], 1e-9),
        "ratio_floor": tot["loop"] / tot["floor"],
        "max_rel_dev_first": max(row["max_rel_dev_first"] for row in rows),
        "max_rel_dev_second": max(row["max_rel_dev_second"] for row in rows),
        "max_bound": max(row["max_bound"] for row in rows),
        "groups": rows,
    }
    print(f"  == {name} r={r}: loop {tot['loop']:.1f} s, fast {tot['fast']:.1f} s ({summary['ratio_fast']:.1f}x), "
          f"cached {tot['cached']:.2f} s ({summary['ratio_cached']:.0f}x; floor {summary['ratio_floor']:.0f}x), "
          f"factors {tot['cached_factored']*1e3:.1f} ms ({summary['ratio_cached_factored']:.0f}x), compact {tot['cached_compact']*1e3:.1f} ms "
          f"({summary['ratio_cached_compact']:.0f}x){' [extrapolated from a subset]' if summary['extrapolated'] else ''}",
          flush=True)
    return summary


# ----------------------------------------------------------------------------------------------------------
# Scaling with width and rank
# ----------------------------------------------------------------------------------------------------------


def time_one(fn, reps):
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def scaling(args, device, gen):
    """Per-matrix times of the full SVD, the fast bases and the floor, vs width (square) and vs r."""
    def point(w, r):
        W = fast.synthetic_layer(w, w, gen).float().to(device)
        W64 = W.double()
        Om = torch.randn(w, r, generator=gen, dtype=torch.float64).to(device)

        def svd():
            torch.linalg.svd(W64, full_matrices=False)
            sync(device)

        def fastb():
            fast.top_r_bases(W, r, method=args.method)
            sync(device)

        def floor():
            W64 @ Om
            sync(device)

        return {"width": w, "r": r, "svd_s": time_one(svd, args.reps), "fast_s": time_one(fastb, args.reps),
                "floor_s": time_one(floor, max(args.reps, 3))}

    widths = [int(x) for x in args.widths]
    by_width = []
    for w in widths:
        by_width.append(point(w, args.scaling_r))
        p = by_width[-1]
        print(f"  width {w:5d} r={args.scaling_r}: svd {p['svd_s']*1e3:8.1f} ms  fast {p['fast_s']*1e3:7.1f} ms  "
              f"floor {p['floor_s']*1e3:6.2f} ms", flush=True)
    by_rank = []
    for r in [int(x) for x in args.ranks_sweep]:
        by_rank.append(point(args.sweep_width, r))
        p = by_rank[-1]
        print(f"  width {args.sweep_width} r={r:4d}: svd {p['svd_s']*1e3:8.1f} ms  fast {p['fast_s']*1e3:7.1f} ms  "
              f"floor {p['floor_s']*1e3:6.2f} ms", flush=True)

    def slope(xs, ys):  # least-squares exponent of y ∝ x^a
        lx = [math.log(x) for x in xs]
        ly = [math.log(y) for y in ys]
        mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
        return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)

    fits = {}
    if len(by_width) >= 2:
        xs = [p["width"] for p in by_width]
        fits["width_exponent"] = {key: slope(xs, [p[key] for p in by_width]) for key in ("svd_s", "fast_s", "floor_s")}
        fits["width_models"] = {"O(mnr), r fixed": 2.0, "O(mn min(m,n))": 3.0}
    if len(by_rank) >= 2:
        xs = [p["r"] for p in by_rank]
        fits["rank_exponent"] = {key: slope(xs, [p[key] for p in by_rank]) for key in ("svd_s", "fast_s", "floor_s")}
        fits["rank_models"] = {"O(mnr)": 1.0, "O(mn min(m,n))": 0.0}
    print(f"  fitted exponents: {json.dumps(fits)}", flush=True)
    return {"by_width": by_width, "by_rank": by_rank, "fits": fits}


# ----------------------------------------------------------------------------------------------------------
# Streaming from a ≥ 2 GB checkpoint
# ----------------------------------------------------------------------------------------------------------

_ST_DTYPE = {torch.float32: ("F32", 4), torch.float16: ("F16", 2), torch.bfloat16: ("BF16", 2)}


def write_safetensors_streaming(path: Path, entries, make, dtype=torch.float32) -> int:
    """Write a safetensors file tensor by tensor (the header first), never holding more than one tensor."""
    code, size = _ST_DTYPE[dtype]
    header, offset = {}, 0
    for name, shape in entries:
        nbytes = shape[0] * shape[1] * size
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", "generator": "lorax_ref scripts/benchmark.py (synthetic)"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, shape in entries:
            t = make(name, shape).to(dtype).contiguous()
            fh.write(t.numpy().tobytes())
    return path.stat().st_size


def stream_test(args, gen) -> dict:
    """Write synthetic SDXL-shaped source/target checkpoints of ≥ stream_gb each, transfer in a child process."""
    target_bytes = int(args.stream_gb * 1e9)
    entries, total = [], 0
    layers = sdxl_layers()
    i = 0
    while total < target_bytes:  # repeat the SDXL inventory (with a suffix) if one copy is not enough
        name, shape = layers[i % len(layers)]
        if i >= len(layers):
            name = f"copy{i // len(layers)}.{name}"
        entries.append((name, shape))
        total += shape[0] * shape[1] * 4
        i += 1
    tmp = Path(args.stream_dir or tempfile.mkdtemp(prefix="lorax_stream_"))
    tmp.mkdir(parents=True, exist_ok=True)
    src, tgt = tmp / "source.safetensors", tmp / "target.safetensors"
    pools = {}

    def pool(shape):
        if shape not in pools:
            k = min(shape)
            pools[shape] = (fast.haar_basis(shape[0], k, gen).float(), fast.haar_basis(shape[1], k, gen).float())
        return pools[shape]

    def make_src(name, shape):  # exact singular vectors from a permuted Haar pool, MiniLM-profile spectrum
        U0, V0 = pool(shape)
        U = U0[torch.randperm(shape[0], generator=gen)]
        V = V0[torch.randperm(shape[1], generator=gen)]
        return (U * fast.synthetic_spectrum(min(shape), gen).float()) @ V.T  # (m, n) float32

    def make_tgt(name, shape):  # the source layer read back + a 10 % Gaussian change
        W = _read_tensor(src, name)
        N = torch.randn(shape, generator=gen)
        return W + 0.1 * (W.norm() / N.norm()) * N

    t0 = time.perf_counter()
    size_s = write_safetensors_streaming(src, entries, make_src)
    size_t = write_safetensors_streaming(tgt, entries, make_tgt)
    t_write = time.perf_counter() - t0
    print(f"  wrote {len(entries)} layers: source {size_s/1e9:.2f} GB, target {size_t/1e9:.2f} GB in {t_write:.0f} s",
          flush=True)
    spot_file = tmp / "spot.safetensors"
    cmd = [sys.executable, os.path.abspath(__file__), "--stream-child", str(src), str(tgt),
           "--stream-r", str(args.stream_r), "--method", args.method, "--seed", str(args.seed),
           "--stream-spot", str(spot_file)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"stream child failed:\n{out.stdout}\n{out.stderr}")
    child = json.loads(out.stdout.strip().splitlines()[-1])
    # independent check, outside the measured process: two layers against the float64 reference
    from safetensors.torch import load_file

    spot, spot_dev = load_file(str(spot_file)), 0.0
    gen_child = torch.Generator().manual_seed(args.seed)  # the child's adapter, regenerated
    with open_checkpoint(src, stream=True) as ck_s, open_checkpoint(tgt, stream=True) as ck_t:
        names = [nm for nm in ck_s.keys() if min(ck_s.shape(nm)) >= args.stream_r]
        adapter = {nm: torch.randn(args.stream_r, generator=gen_child, dtype=torch.float64) for nm in names}
        for nm, ts in spot.items():
            U_s, _, V_s = svd_topk(ck_s.get(nm).double(), args.stream_r)
            U_t, _, V_t = svd_topk(ck_t.get(nm).double(), args.stream_r)
            ref = transfer_same_dim(lorax_delta(U_s, adapter[nm], V_s), U_t, V_t)
            spot_dev = max(spot_dev, rel(U_t @ ts @ V_t.T, ref))
    spot_file.unlink()
    child.update({"file_bytes_source": size_s, "file_bytes_target": size_t, "wall_s": wall, "spot_dev": spot_dev,
                  "spot_layers": sorted(spot), "peak_rss_fraction_of_file": child["peak_rss_mb"] * 2**20 / size_s})
    print(f"  streamed {child['layers']} layers in {child['transfer_s']:.0f} s: peak RSS {child['peak_rss_mb']:.0f} MB "
          f"= {child['peak_rss_fraction_of_file']:.3f} of the {size_s/1e9:.2f} GB checkpoint "
          f"(target < 0.25); max bound {child['max_bound']:.1e}; spot-check deviation {child['spot_dev']:.1e}", flush=True)
    if not args.keep_stream:
        src.unlink()
        tgt.unlink()
        try:
            tmp.rmdir()
        except OSError:
            pass
    return child


def _read_tensor(path: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def stream_child(src: str, tgt: str, r: int, args) -> None:
    """Runs in its own process: stream the transfer, report peak RSS (VmHWM) as JSON on the last line.

    Only the transfer runs here (the compact ΔΣ_{t←s} of every layer is computed and dropped, as a writer
    would); two of them are saved for the parent to check against the reference outside this process.
    """
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    with open_checkpoint(src, stream=True) as ck_s, open_checkpoint(tgt, stream=True) as ck_t:
        names = [nm for nm in ck_s.keys() if min(ck_s.shape(nm)) >= r]
        adapter = {nm: torch.randn(r, generator=gen, dtype=torch.float64) for nm in names}
        max_bound, methods, n = 0.0, {}, 0
        spot_names = {names[0], names[len(names) // 2]}
        spot = {}
        for nm, ts, bound, how in stream_transfer(ck_s, ck_t, adapter, r, method=args.method):
            max_bound = max(max_bound, bound)
            methods[how] = methods.get(how, 0) + 1
            n += 1
            if nm in spot_names:
                spot[nm] = ts.contiguous()
            del ts
    transfer_s = time.perf_counter() - t0
    peak = peak_mb(torch.device("cpu"))
    if args.stream_spot:
        save_file(spot, args.stream_spot)
    print(json.dumps({"layers": n, "r": r, "transfer_s": transfer_s, "peak_rss_mb": peak,
                      "max_bound": max_bound, "methods": methods}))


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def conditions(device) -> dict:
    info = {
        "python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
        "processor": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": str(device), "loadavg_start": loadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["sd15", "sdxl"], choices=sorted(MODELS))
    ap.add_argument("--ranks", nargs="+", type=int, default=[320, 64])
    ap.add_argument("--subset", nargs="+", default=None, metavar="N|MODEL=N",
                    help="time at most N layers per shape group (small machines); 'sdxl=8' limits one model only")
    ap.add_argument("--chunk", type=int, default=4, help="same-shaped layers batched together by the fast path (CPU)")
    ap.add_argument("--gpu-chunk", type=int, default=16, help="same, on CUDA")
    ap.add_argument("--method", default="auto", choices=fast.BASIS_METHODS)
    ap.add_argument("--device", default="all", help="cpu, cuda, or 'all' (cpu, then cuda when present)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads; use 1 on a shared machine: multi-threaded LAPACK slows down "
                         "many-fold when another process holds a core, which would inflate the ratios")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--widths", nargs="+", default=[320, 640, 960, 1280, 1600, 2048])
    ap.add_argument("--scaling-r", type=int, default=64)
    ap.add_argument("--sweep-width", type=int, default=1280)
    ap.add_argument("--ranks-sweep", nargs="+", default=[32, 64, 128, 256, 320, 512])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--stream", action="store_true", help="streaming test from synthetic ≥ --stream-gb checkpoints")
    ap.add_argument("--stream-gb", type=float, default=2.2)
    ap.add_argument("--stream-r", type=int, default=64)
    ap.add_argument("--stream-dir", default=None)
    ap.add_argument("--keep-stream", action="store_true")
    ap.add_argument("--stream-child", nargs=2, metavar=("SRC", "TGT"), help=argparse.SUPPRESS)
    ap.add_argument("--stream-spot", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="--subset 2 --widths 320 640 1280 --ranks-sweep 64 320")
    ap.add_argument("--out", default="benchmark_results.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stream_child:
        stream_child(*args.stream_child, args.stream_r, args)
        return 0
    if args.quick:
        args.subset = args.subset or ["2"]
        args.widths = [320, 640, 1280]
        args.ranks_sweep = [64, 320]
        args.reps = 1
    devices = [torch.device("cpu")]
    if args.device == "all" and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif args.device not in ("cpu", "all"):
        devices = [torch.device(args.device)]
    results = {"command": " ".join(sys.argv[1:] if argv is None else argv), "conditions": conditions(devices[0]),
               "args": {k: v for k, v in vars(args).items()}, "runs": {}}
    for device in devices:
        gen = torch.Generator().manual_seed(args.seed)
        run = {"models": [], "conditions": conditions(device)}
        print(f"device {device} ({run['conditions']['processor'] if device.type == 'cpu' else run['conditions'].get('cuda_device')}), "
              f"{torch.get_num_threads()} threads, load {loadavg()}", flush=True)
        with fast.solver._no_tf32():
            for name in args.models:
                for r in args.ranks:
                    run["models"].append(run_model(name, r, args, device, gen))
            if not args.no_scaling:
                print("scaling (per matrix; svd = one full float64 SVD, the loop takes two per layer)", flush=True)
                run["scaling"] = scaling(args, device, gen)
        run["conditions"]["loadavg_end"] = loadavg()
        results["runs"][device.type] = run
    if args.stream:
        print("streaming", flush=True)
        results["stream"] = stream_test(args, torch.Generator().manual_seed(args.seed))
    results["conditions"]["loadavg_end"] = loadavg()
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
