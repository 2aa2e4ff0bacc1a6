"""kdlib: the distillation losses, layer alignment, caches and trainers behind the book.

A thin library: nothing here knows a paper's numbers or a chapter's experiment (those live
beside the chapters, in the book's `experiments` package). One concept per module:

- losses and their trainers: `losses` (soft-target KL, the two-weight mix), `trainer`
  (`DistillationTrainer`, `quiet_arguments`), `lm` and `lm_trainer` (token-level KD for causal
  LMs, `(1 - a) KD + a CLM` in one blockwise pass), `alignment` and `layer_distillation`
  (which teacher layers, matched to which student layers; the CoFi / RAIL-KD layer loss),
  `theseus` (module replacement: binary and proportional);
- teachers' outputs computed once: `cache` (fingerprinted, multi-process safe), `qa_teacher`
  (a QA teacher's span logits), `lm_cache` (an LM teacher's top-k), and the hidden states of
  `layer_distillation.cached_teacher_states`;
- models and data: `registry` (offline model names), `stack` (layer cuts and warm starts),
  `data`, `lm_data`, `qa` (SQuAD windows, decoding, official EM/F1), `classification`,
  `batching`, `zeroshot` (lm-eval over local task files);
- results: `stats` (seed summaries, paired and Welch tests), `report` (metrics.json, claims),
  `config` (checked parameters), `hub` (fail fast offline), `runtime` (CPU allocator).
"""

__version__ = "0.1.0"
