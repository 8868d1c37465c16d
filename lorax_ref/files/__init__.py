"""Files in, files out: everything between the equations and the disk.

* :mod:`~lorax_ref.files.checkpoints` — the checkpoint-reader family (safetensors, memory-mapped or streamed;
  ONNX in :mod:`~lorax_ref.files.onnx`; pickles only when allowed) behind one :func:`open_checkpoint`;
* :mod:`~lorax_ref.files.adapters` — PEFT, kohya and compact LoRA-X adapter files, read and written;
* :mod:`~lorax_ref.files.transfer` — the one adapter-transfer pipeline (``python -m lorax_ref transfer``);
* :mod:`~lorax_ref.files.cache` — the on-disk cache of truncated bases (``$LORAX_CACHE_DIR``);
* :mod:`~lorax_ref.files.output` — atomic output directories that never touch an input;
* :mod:`~lorax_ref.files.example` — seeded random adapters for demonstrations and tests.
"""
