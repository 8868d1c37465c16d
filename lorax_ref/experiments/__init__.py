"""The real-model experiments of notebooks 07, 08 and 11, and the notebooks' display helpers.

* :mod:`~lorax_ref.experiments.minilm` — a torch MiniLM (BERT) encoder built from the packaged checkpoints,
  with LoRA / LoRA-X adapter modules;
* :mod:`~lorax_ref.experiments.bbc` — the BBC News corpus (headlines and topics) from its registry package;
* :mod:`~lorax_ref.experiments.realtask` — the headline-retrieval task: training, transfer, evaluation;
* :mod:`~lorax_ref.experiments.plotting` — plotly figures and the stable-digit printing of the notebooks.
"""
