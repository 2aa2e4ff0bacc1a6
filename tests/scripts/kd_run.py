"""A tiny distillation run for the multi-process and interruption tests (run as a script).

`python kd_run.py OUT [--per-device N] [--steps N] [--save-steps N] [--kill-at N] [--resume]
[--sampling S]`
trains a 1-layer BERT classifier from a 2-layer teacher's cached logits and writes
OUT/result-<rank>.json: the logged losses, the cache hits/misses and a weights checksum.
Launched under torchrun, every rank writes its own file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for kdlib

from kdlib.batching import FeatureDataset, PadCollator  # noqa: E402
from kdlib.cache import TeacherOutputCache, cache_key  # noqa: E402
from kdlib.trainer import DistillationArguments, DistillationTrainer  # noqa: E402


def tiny(layers: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


class KillAt(TrainerCallback):
    """SIGKILL this process when step `step` ends: no handler, no clean-up, like an OOM kill."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-device", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--sampling", default="sequential", choices=["sequential", "random", "group_by_length"]
    )
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    args.out.mkdir(parents=True, exist_ok=True)

    g = torch.Generator().manual_seed(0)
    ids = [
        torch.randint(5, 50, (int(n),), generator=g).tolist()
        for n in torch.randint(4, 12, (64,), generator=g)
    ]
    columns = {
        "input_ids": ids,
        "attention_mask": [[1] * len(x) for x in ids],
        "labels": [i % 3 for i in range(64)],
    }

    training = DistillationArguments(
        output_dir=str(args.out / "checkpoints"),
        per_device_train_batch_size=args.per_device,
        max_steps=args.steps,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        seed=3,
        train_sampling_strategy=args.sampling,
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        dataloader_pin_memory=False,
        report_to="none",
        disable_tqdm=True,
    )
    teacher = tiny(2, seed=0).eval()
    cache = TeacherOutputCache(args.out / "cache")

    def compute():
        with (args.out / "teacher-runs.log").open("a") as log:
            log.write(f"rank {rank}\n")
        with torch.no_grad():
            return {"logits": np.stack([teacher(input_ids=torch.tensor([x])).logits[0].numpy() for x in ids])}

    stored = cache.get_or_compute(cache_key(kind="ddp-test"), compute)
    columns["teacher_logits"] = list(stored["logits"])
    trainer = DistillationTrainer(
        model=tiny(1, seed=1),
        args=training,
        train_dataset=FeatureDataset(columns),
        data_collator=PadCollator(0),
        callbacks=[KillAt(args.kill_at)] if args.kill_at else None,
    )
    trainer.train(resume_from_checkpoint=args.resume or None)
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    result = {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "kd_terms": [h["loss_kd"] for h in trainer.state.log_history if "loss_kd" in h],
        "hits": cache.hits,
        "misses": cache.misses,
        "weights": weights.tolist(),
        "world_size": training.world_size,
    }
    (args.out / f"result-{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
