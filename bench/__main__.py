"""`python -m bench`: what distillation costs against its physical limit, as ratios in one run.

The least a distillation step can cost is the student's training step plus one inference-mode
forward pass of the teacher; with the teacher's outputs cached, the student's step alone. This
measures, on the default profile's models and real batches, in one process and interleaved
step by step (the machine is noisy; only ratios taken together mean anything):

- QA (chapter 1: MiniLM-L6 SQuAD teacher, the chapter's student, 192-token windows, batch 16):
  online KD step / (plain step + teacher forward); cached KD step / plain step; the teacher's
  forward in float32 vs bfloat16; a whole 3-epoch run with `kdlib` (teacher logits computed
  once, cached; windows padded per length-grouped batch) vs the blog's `DistillationTrainer`
  (`bench/blog_trainer.py`: teacher in float32 on every step, windows padded to 192), with their
  losses on one padding-free first batch compared, and each run's peak memory; and the same
  run with TextBrewer's `BasicDistiller` (teacher logits cached, its fastest setting) as the
  field's peer (`pip install --no-deps -r requirements-bench.txt`; skipped without it);
- the student's own step (`--setting student`; chapter 1's, cached KD): float32 at the default
  thread count and at one thread, bf16 autocast, and `torch.compile`, with the span logits'
  largest difference from float32 eager: what a reference run may adopt without changing results;
- layer distillation (chapter 2, `--setting layers`): the layer-distillation step on the
  teacher's cached states against its limit, the student's own step returning hidden states
  (no online variant: MPNet's vocabulary is not MiniLM's), float32 and bf16 autocast; and the
  layer-loss matrix, forward and
  backward, at the chapter's shape and at CoFi's: the former formulation, which held every
  pair's difference as one `[k, m, batch, seq, width]` tensor, against
  `kdlib.alignment.layer_loss_matrix`: time, peak memory, and the largest relative difference
  of the matrix and a gradient;
- module replacement (chapter 4, `--setting theseus`): a replacing step, binary (p = 0.5) and
  proportional add, against the predecessor's forward + the successor's own step;
- causal LM (chapter 3: SmolLM2-135M teacher, 24-layer student, 8 x 128 packed WikiText, bf16):
  online KD step / (CLM step + teacher forward); cached top-k KD step / CLM step; each step's
  peak memory against the CLM step's (each in its own process), as the peak resident memory and
  as the peak of the tensors alive at once (exact: no allocator slack); the cache's size per token, and
  how much of the full-vocabulary KL a top-k cache keeps.

Prints a report and writes it as JSON (`--json`). Needs the data mirror and the offline models
(KDLIB_DATA_DIR, KDLIB_MODELS_DIR), like the book.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch

from bench.measure import (
    blog_run,
    in_own_process,
    kdlib_run,
    layer_matrix,
    layer_steps,
    lm_memory,
    lm_steps,
    qa_first_step_losses,
    qa_steps,
    student_steps,
    textbrewer_run,
    theseus_steps,
)
from kdlib.runtime import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--setting", choices=("qa", "student", "layers", "theseus", "lm", "all"), default="all"
    )
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (after one warm-up)")
    parser.add_argument(
        "--windows", type=int, default=256, help="training windows of the whole-run comparison"
    )
    parser.add_argument("--epochs", type=float, default=3.0, help="epochs of the whole-run comparison")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    opts = parser.parse_args()
    keep_freed_memory()  # as the book runs (kdlib.runtime); the whole runs' processes inherit it
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
        "torch": torch.__version__,
    }
    if opts.setting in ("qa", "all"):
        report["qa_steps"] = qa_steps(opts.steps)
        first = qa_first_step_losses()
        first["relative_difference"] = abs(first["blog"] - first["kdlib"]) / abs(first["blog"])
        report["qa_first_step_loss"] = first
        blog = in_own_process(blog_run, opts.windows, opts.epochs)
        ours = in_own_process(kdlib_run, opts.windows, opts.epochs, False)
        ours_bf16 = in_own_process(kdlib_run, opts.windows, opts.epochs, True)
        peer = in_own_process(textbrewer_run, opts.windows, opts.epochs)
        report["qa_whole_run"] = {
            "blog": blog,
            "kdlib": ours,
            "kdlib_bf16_teacher": ours_bf16,
            "textbrewer": peer,
            "speedup": blog["seconds"] / ours["seconds"],
            "speedup_bf16_teacher": blog["seconds"] / ours_bf16["seconds"],
        }
        if "seconds" in peer:
            report["qa_whole_run"]["textbrewer_over_kdlib"] = peer["seconds"] / ours["seconds"]
    if opts.setting in ("student", "all"):
        report["student_steps"] = student_steps(opts.steps)
    if opts.setting in ("layers", "all"):
        report["layer_steps"] = layer_steps(opts.steps)
        report["layer_matrix"] = layer_matrix()
    if opts.setting in ("theseus", "all"):
        report["theseus_steps"] = theseus_steps(opts.steps)
    if opts.setting in ("lm", "all"):
        report["lm_steps"] = lm_steps(opts.steps)
        report["lm_memory"] = lm_memory()
    print(json.dumps(report, indent=2))
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
