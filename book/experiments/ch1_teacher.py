"""Fine-tune the default profile's SQuAD teacher, with its recipe recorded beside the weights.

`make teacher` (`python -m experiments.ch1_teacher`) reproduces the shared `minilm-l6-squad` checkpoint:
MiniLM-L6 with a fresh QA head, fine-tuned on SQuAD v1.1 dev articles 0-37 (articles 38-47 are
never seen, so chapter 1 can hold them out), windows of 192 tokens with stride 64, batch 16,
1,000 steps of AdamW (lr 1e-4, weight decay 0.01, 10% linear warmup then linear decay,
gradient clipping 1.0), seed 0, fp32. About 40 minutes on 2 CPU cores. The result is saved
where the registry looks for `minilm-l6-squad` when $KDLIB_MODELS_DIR does not have it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import transformers

from kdlib import qa
from kdlib.batching import PadCollator
from kdlib.config import check_range, from_mapping
from kdlib.data import load_squad, split_by_article
from kdlib.qa_teacher import load_qa_model, window_dataset
from kdlib.registry import cache_dir, write_stamp
from kdlib.trainer import DistillationArguments, DistillationTrainer


@dataclass
class TeacherRecipe:
    base: str = "minilm-l6"
    heldout_articles: list[int] = field(default_factory=lambda: list(range(38, 48)))
    max_length: int = 192
    stride: int = 64
    batch_size: int = 16
    max_steps: int = 1000
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    seed: int = 0
    data_dir: str = ""
    output: str = ""

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "stride"):
            check_range(name, getattr(self, name), low=1)
        check_range("learning_rate", self.learning_rate, low=0.0, low_inclusive=False)
        check_range("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0, high_inclusive=False)

    def target(self) -> Path:
        return Path(self.output) if self.output else cache_dir() / "teachers" / "minilm-l6-squad"


def train_teacher(recipe: TeacherRecipe) -> Path:
    """Fine-tune, then move the finished folder into place (never a half-written teacher)."""
    transformers.set_seed(recipe.seed)
    model, tokenizer = load_qa_model(recipe.base)
    train, _, split = split_by_article(
        load_squad("validation", recipe.data_dir or None), recipe.heldout_articles
    )
    windows = qa.prepare_windows(train, tokenizer, recipe.max_length, recipe.stride)
    target = recipe.target()
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".teacher-", dir=target.parent))
    try:
        args = DistillationArguments(
            output_dir=str(scratch / "checkpoints"),
            per_device_train_batch_size=recipe.batch_size,
            learning_rate=recipe.learning_rate,
            weight_decay=recipe.weight_decay,
            warmup_steps=recipe.warmup_ratio,
            max_steps=recipe.max_steps,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            logging_steps=50,
            save_strategy="no",
            seed=recipe.seed,
            alpha_ce=0.0,
            alpha_task=1.0,
            dataloader_pin_memory=False,
            report_to="none",
            print_logs=False,  # the progress bar shows the loss
        )
        trainer = DistillationTrainer(
            model=model,
            args=args,
            train_dataset=window_dataset(windows, None),
            data_collator=PadCollator(tokenizer.pad_token_id),
            processing_class=tokenizer,
        )
        trainer.train()
        shutil.rmtree(scratch / "checkpoints", ignore_errors=True)
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        write_stamp(scratch, recipe=asdict(recipe), split=split, train_windows=len(windows))
        if target.exists():
            shutil.rmtree(target)
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-steps", type=int, default=TeacherRecipe.max_steps)
    parser.add_argument("--seed", type=int, default=TeacherRecipe.seed)
    parser.add_argument("--output", default="", help="default: <cache>/teachers/minilm-l6-squad")
    args = parser.parse_args(argv)
    recipe = from_mapping(
        TeacherRecipe, {"max_steps": args.max_steps, "seed": args.seed, "output": args.output}
    )
    print(f"teacher saved to {train_teacher(recipe)}")


if __name__ == "__main__":
    main()
