"""What `python -m bench` measures; see `bench/__main__.py` for what and why."""

from __future__ import annotations

import copy
import multiprocessing
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

QA_OVERRIDES = {"eval_questions": 8, "curve_questions": 0}
BATCH = 16  # chapter 1's default batch size


def reset_peak() -> None:
    """Start the process's peak-RSS count afresh (Linux: VmHWM), so a peak measures what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the peak includes what came before


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux) in MB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_mb() -> float:
    """Peak resident memory since `reset_peak` (Linux), else since the process started."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mb() -> float:
    """Resident memory now (Linux), else the peak so far."""
    now = _status_mb("VmRSS")
    return now if now is not None else peak_mb()


def tensor_peak_mb(call: Callable[[], Any]) -> float:
    """Peak MB of the tensors `call()` holds at once beyond those alive before it, summed from
    the profiler's record of every allocation and free. Unlike the resident-memory peak it counts
    no allocator slack, so it reads the same on every run."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events, todo = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        event = todo.pop()
        todo.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak / 2**20


def interleaved(variants: dict[str, Callable[[int], Any]], steps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each variant, called in turn on step i = 0, 1, ... ."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(warmup + steps):
        for name, call in variants.items():
            started = time.perf_counter()
            call(i)
            if i >= warmup:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def _args(tmp: str, distil: bool, **extra: Any) -> Any:
    from kdlib.trainer import DistillationArguments

    return DistillationArguments(
        output_dir=tmp,
        alpha_ce=0.5 if distil else 0.0,
        alpha_task=0.5 if distil else 1.0,
        temperature=2.0,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        save_strategy="no",
        dataloader_pin_memory=False,
        **extra,
    )


def _train_step(trainer: Any, model: torch.nn.Module, optimizer: Any, batch: dict, bf16: bool) -> float:
    """One training step as the Trainer takes it: forward and loss, backward, AdamW step."""
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
        loss = trainer.compute_loss(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def precision_comparison(
    pairs: dict[str, tuple[tuple[float, float], tuple[float, float]]],
) -> dict[str, dict[str, float]]:
    """Per step kind, from ((float32 seconds, loss), (bf16 seconds, loss)) of two runs from the
    same weights over the same steps: bf16 autocast's speed-up and how far apart the losses end."""
    return {
        kind: {
            "speedup": fp32_seconds / bf16_seconds,
            "loss_fp32": fp32_loss,
            "loss_bf16": bf16_loss,
            "loss_relative_difference": abs(bf16_loss - fp32_loss) / abs(fp32_loss),
        }
        for kind, ((fp32_seconds, fp32_loss), (bf16_seconds, bf16_loss)) in pairs.items()
    }


# --- QA (chapter 1) ----------------------------------------------------------------------------


def _qa_config(windows: int) -> Any:
    from bookrun.chapters import CHAPTERS
    from bookrun.params import chapter_config, resolve

    values = resolve(CHAPTERS["ch1"], "default", {**QA_OVERRIDES, "max_train_windows": windows})
    return chapter_config(CHAPTERS["ch1"], **values)


def _student(cfg: Any) -> tuple[torch.nn.Module, Any]:
    """Chapter 1's student as its runs start (cut to `student_layers` where the profile says)."""
    from experiments.ch1_distilbert_squad import load_student

    return load_student(cfg)


def _qa_data(windows: int) -> tuple[Any, Any, Any, Any]:
    from experiments.ch1_distilbert_squad import prepare_data
    from kdlib.qa_teacher import load_qa_model

    cfg = _qa_config(windows)
    teacher, tokenizer = load_qa_model(cfg.teacher)
    data = prepare_data(cfg, tokenizer)
    return cfg, teacher.eval(), tokenizer, data


def _qa_batches(count: int) -> tuple[Any, Any, Any, list[dict[str, torch.Tensor]]]:
    """`count` + 1 training batches of chapter 1 in data order, with the teacher's span logits."""
    from kdlib.batching import PadCollator
    from kdlib.qa_teacher import span_logits, window_dataset

    cfg, teacher, tokenizer, data = _qa_data((count + 1) * BATCH)
    logits = span_logits(teacher, data.train, tokenizer.pad_token_id)
    dataset = window_dataset(data.train, logits)
    collate = PadCollator(tokenizer.pad_token_id)
    size = cfg.batch_size
    batches = [
        collate([dataset[j] for j in range(i * size, (i + 1) * size)]) for i in range(len(dataset) // size)
    ]
    return cfg, teacher, data, batches


def qa_steps(steps: int) -> dict[str, Any]:
    from kdlib.trainer import DistillationTrainer, forward_inputs

    cfg, teacher, data, batches = _qa_batches(steps)
    size = cfg.batch_size
    online = [{k: v for k, v in b.items() if not k.startswith("teacher_")} for b in batches]
    student, _ = _student(cfg)
    models = {name: copy.deepcopy(student) for name in ("plain", "online", "cached")}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            "plain": DistillationTrainer(model=models["plain"], args=_args(tmp, False)),
            "online": DistillationTrainer(
                model=models["online"], args=_args(tmp, True), teacher_model=teacher
            ),
            "cached": DistillationTrainer(model=models["cached"], args=_args(tmp, True)),
        }
        optimizers = {name: trainer.create_optimizer() for name, trainer in trainers.items()}

        def forward(bf16: bool) -> Callable[[int], Any]:
            def call(i: int) -> None:
                with (
                    torch.inference_mode(),
                    torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext(),
                ):
                    teacher(**forward_inputs(teacher, online[i % len(online)], labels=False))

            return call

        def step(name: str, source: list[dict]) -> Callable[[int], Any]:
            return lambda i: _train_step(
                trainers[name], models[name], optimizers[name], source[i % len(source)], False
            )

        seconds = interleaved(
            {
                "plain_step": step("plain", online),
                "teacher_forward_fp32": forward(False),
                "teacher_forward_bf16": forward(True),
                "online_kd_step": step("online", online),
                "cached_kd_step": step("cached", batches),
            },
            steps,
        )
    with torch.inference_mode():
        b = online[0]
        fp32 = teacher(**forward_inputs(teacher, b, labels=False)).start_logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = teacher(**forward_inputs(teacher, b, labels=False)).start_logits.float()
    lengths = data.train.lengths()
    return {
        "seconds": seconds,
        "online_over_limit": seconds["online_kd_step"]
        / (seconds["plain_step"] + seconds["teacher_forward_fp32"]),
        "cached_over_plain": seconds["cached_kd_step"] / seconds["plain_step"],
        "teacher_bf16_speedup": seconds["teacher_forward_fp32"] / seconds["teacher_forward_bf16"],
        "teacher_bf16_max_logit_error": float((fp32 - bf16).abs().max()),
        "cache_bytes_per_window": 2 * 4 * max(lengths),
        "batch": f"{size} windows, mean {sum(lengths) / len(lengths):.0f} tokens (max {cfg.max_length})",
    }


def student_steps(steps: int) -> dict[str, Any]:
    """Chapter 1's cached-KD student step in float32 (2 threads, then 1), bf16 autocast, compiled.

    What the reference runs may adopt: a setting that is faster and changes no result. Each
    variant trains its own copy of the student from the same weights over the same batches; the
    compiled one (`torch.compile`, dynamic shapes, as length-grouped batches vary in length) is
    warmed up over every batch first (`Module.compile`, in place), so its compile time is
    reported apart. "Changes no result"
    is checked on the untrained student in eval mode: the largest span-logit difference from
    float32 eager on one batch (dropout draws differ between eager and compiled code).
    """
    from kdlib.trainer import DistillationTrainer, forward_inputs

    cfg, _, _, batches = _qa_batches(steps)
    batches = batches[:steps]
    student, _ = _student(cfg)
    names = ("fp32", "fp32_1thread", "bf16", "compiled")
    models = {name: copy.deepcopy(student) for name in names}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: DistillationTrainer(model=models[name], args=_args(tmp, True)) for name in names}
        optimizers = {name: trainer.create_optimizer() for name, trainer in trainers.items()}
        compiled = models["compiled"]
        compiled.compile(dynamic=True)  # in place: the module keeps its forward's signature
        started = time.perf_counter()
        for batch in batches:  # compiles, and warms every shape
            _train_step(trainers["compiled"], compiled, optimizers["compiled"], batch, False)
        compile_seconds = time.perf_counter() - started

        def step(name: str, model: torch.nn.Module, bf16: bool = False, n_threads: int = threads) -> Callable:
            def call(i: int) -> None:
                torch.set_num_threads(n_threads)
                _train_step(trainers[name], model, optimizers[name], batches[i % len(batches)], bf16)
                torch.set_num_threads(threads)

            return call

        seconds = interleaved(
            {
                "fp32": step("fp32", models["fp32"]),
                "fp32_1thread": step("fp32_1thread", models["fp32_1thread"], n_threads=1),
                "bf16": step("bf16", models["bf16"], bf16=True),
                "compiled": step("compiled", compiled),
            },
            steps,
        )
        reference = copy.deepcopy(student).eval()
        probe = forward_inputs(reference, batches[0], labels=False)
        with torch.inference_mode():
            eager = reference(**probe).start_logits
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = reference(**probe).start_logits.float()
            reference.compile(dynamic=True)
            compiled_eval = reference(**probe).start_logits
    return {
        "seconds": seconds,
        "threads": threads,
        "compile_seconds_first_pass": compile_seconds,
        "speedup_bf16": seconds["fp32"] / seconds["bf16"],
        "speedup_compiled": seconds["fp32"] / seconds["compiled"],
        "speedup_2_threads_over_1": seconds["fp32_1thread"] / seconds["fp32"],
        "bf16_max_logit_error": float((eager - bf16).abs().max()),
        "compiled_max_logit_error": float((eager - compiled_eval).abs().max()),
        "batches": f"{len(batches)} of {cfg.batch_size} windows, lengths "
        + ", ".join(str(b["input_ids"].shape[1]) for b in batches),
    }


def _whole_run_schedule(cfg: Any, epochs: float) -> dict[str, Any]:
    """The optimiser, schedule and logging that the blog's run and kdlib's share, so that the
    whole-run ratio compares trainers and nothing else (`warmup_steps` below 1 is a ratio)."""
    return dict(
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        num_train_epochs=epochs,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear",
        seed=0,
        logging_steps=1,
    )


def blog_run(windows: int, epochs: float) -> dict[str, Any]:
    """A whole run with the blog's trainer, in its own process (for its peak memory)."""
    from transformers import PrinterCallback, TrainingArguments

    from bench.blog_trainer import BlogDistillationTrainer, FixedLengthCollator
    from kdlib.qa_teacher import window_dataset

    cfg, teacher, tokenizer, data = _qa_data(windows)
    reset_peak()  # the run's own memory: models and data are loaded alike in both
    started = time.perf_counter()
    student, _ = _student(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = BlogDistillationTrainer(
            model=student,
            args=TrainingArguments(
                output_dir=tmp,
                **_whole_run_schedule(cfg, epochs),
                save_strategy="no",
                report_to="none",
                use_cpu=True,
                disable_tqdm=True,
                remove_unused_columns=False,
                dataloader_pin_memory=False,
            ),
            train_dataset=window_dataset(data.train, None),
            data_collator=FixedLengthCollator(tokenizer.pad_token_id, cfg.max_length),
            teacher_model=teacher,
            temperature=cfg.temperature,
            alpha_ce=cfg.alpha_ce,
            alpha_squad=cfg.alpha_squad,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "seconds": time.perf_counter() - started,
        "peak_mb": peak_mb(),
        "steps": trainer.state.global_step,
        "last_loss": losses[-1],
    }


def kdlib_run(windows: int, epochs: float, teacher_bf16: bool) -> dict[str, Any]:
    """The same run with kdlib: teacher logits once (cached), length-grouped dynamic padding."""
    from transformers import PrinterCallback

    from kdlib.batching import PadCollator
    from kdlib.cache import TeacherOutputCache
    from kdlib.qa_teacher import teacher_span_logits, window_dataset
    from kdlib.trainer import DistillationTrainer

    cfg, teacher, tokenizer, data = _qa_data(windows)
    reset_peak()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        logits = teacher_span_logits(
            teacher,
            data.train,
            tokenizer.pad_token_id,
            TeacherOutputCache(tmp),
            precision="bfloat16" if teacher_bf16 else "float32",  # the chapter's teacher_precision
        )
        teacher_seconds = time.perf_counter() - started
        student, _ = _student(cfg)
        trainer = DistillationTrainer(
            model=student,
            args=_args(
                tmp,
                True,
                **_whole_run_schedule(cfg, epochs),
                train_sampling_strategy="group_by_length",
            ),
            train_dataset=window_dataset(data.train, logits),
            data_collator=PadCollator(tokenizer.pad_token_id),
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "seconds": time.perf_counter() - started,
        "teacher_seconds": teacher_seconds,
        "peak_mb": peak_mb(),
        "steps": trainer.state.global_step,
        "last_loss": losses[-1],
    }


def textbrewer_run(windows: int, epochs: float) -> dict[str, Any]:
    """The same run with TextBrewer 0.2.1's `BasicDistiller`, the field's distillation toolkit.

    Its fastest setting: teacher logits computed once for every batch (`is_caching_logits`),
    batches padded per batch in random order (TextBrewer has no length grouping), the same
    optimiser and schedule. Its soft loss is the tempered cross-entropy summed over the start
    and end logits, without T^2: its weight is set so the gradient matches the others'.
    """
    try:
        from textbrewer import BasicDistiller, DistillationConfig, TrainingConfig
    except ImportError as err:
        return {"skipped": f"{err}: pip install --no-deps -r requirements-bench.txt"}
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    from kdlib.batching import PadCollator
    from kdlib.qa_teacher import window_dataset

    cfg, teacher, tokenizer, data = _qa_data(windows)
    reset_peak()
    started = time.perf_counter()
    torch.manual_seed(0)
    student, _ = _student(cfg)
    loader = DataLoader(
        window_dataset(data.train, None),
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=PadCollator(tokenizer.pad_token_id),
    )

    def adaptor(batch: dict, outputs: Any) -> dict[str, Any]:
        return {"logits": [outputs.start_logits, outputs.end_logits], "losses": [outputs.loss]}

    steps = int(len(loader) * epochs)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    with tempfile.TemporaryDirectory() as tmp:
        distiller = BasicDistiller(
            train_config=TrainingConfig(device="cpu", log_dir=None, output_dir=tmp),
            distill_config=DistillationConfig(
                temperature=cfg.temperature,
                kd_loss_type="ce",
                kd_loss_weight=cfg.alpha_ce * cfg.temperature**2 / 2,  # DistilBERT's T^2, mean of two
                hard_label_weight=cfg.alpha_squad,
                is_caching_logits=True,
            ),
            model_T=teacher,
            model_S=student,
            adaptor_T=adaptor,
            adaptor_S=adaptor,
        )
        with distiller:
            distiller.train(
                optimizer,
                loader,
                num_epochs=int(epochs),
                scheduler_class=get_linear_schedule_with_warmup,
                scheduler_args={
                    "num_warmup_steps": int(cfg.warmup_ratio * steps),
                    "num_training_steps": steps,
                },
            )
    return {"seconds": time.perf_counter() - started, "peak_mb": peak_mb(), "steps": steps}


def in_own_process(target: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """`target(*args)` in a fresh process (its peak memory is its own); its error is raised here."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(target, *args).result()


def qa_first_step_losses() -> dict[str, float]:
    """Both trainers' loss on one batch of full-length windows (no padding), same weights."""
    from bench.blog_trainer import BlogDistillationTrainer, FixedLengthCollator
    from kdlib.qa_teacher import window_dataset
    from kdlib.trainer import DistillationTrainer

    cfg, teacher, tokenizer, data = _qa_data(400)
    full = [i for i, n in enumerate(data.train.lengths()) if n == cfg.max_length][: cfg.batch_size]
    dataset = window_dataset(data.train, None)
    batch = FixedLengthCollator(tokenizer.pad_token_id, cfg.max_length)([dataset[i] for i in full])
    student, _ = _student(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        blog = BlogDistillationTrainer(
            model=student,
            args=_args(tmp, True),
            teacher_model=teacher,
            temperature=cfg.temperature,
            alpha_ce=cfg.alpha_ce,
            alpha_squad=cfg.alpha_squad,
        )
        ours = DistillationTrainer(model=student, args=_args(tmp, True), teacher_model=teacher)
        student.eval()  # no dropout: the two losses see the same forward pass
        with torch.no_grad():
            return {
                "blog": float(blog.compute_loss(student, batch)),
                "kdlib": float(ours.compute_loss(student, batch)),
            }


# --- causal LM (chapter 3) ---------------------------------------------------------------------


def _lm_args(tmp: str, distil: bool) -> Any:
    from kdlib.lm_trainer import LMDistillationArguments

    return LMDistillationArguments(
        output_dir=tmp,
        alpha_ce=0.5 if distil else 0.0,
        alpha_task=0.5 if distil else 1.0,
        temperature=2.0,
        bf16=True,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )


def _lm_setup(steps: int, topk: int) -> tuple[Any, Any, list[dict], list[dict]]:
    """Chapter 3's teacher, its 24-layer student, and `steps` + 1 batches of 8 x 128 packed
    WikiText tokens: with the teacher's cached top-k, and without (for the online step)."""
    from transformers import AutoModelForCausalLM

    from kdlib.batching import FeatureDataset, PadCollator
    from kdlib.lm_cache import compute_topk
    from kdlib.lm_data import load_lm_documents, pack
    from kdlib.registry import load_pretrained
    from kdlib.stack import keep_layers, middle_block

    teacher, tokenizer = load_pretrained("smollm2-135m", AutoModelForCausalLM)
    teacher.eval().requires_grad_(False)
    text = "\n".join(load_lm_documents("wikitext2-test")[:6])
    rows = pack([tokenizer(text, add_special_tokens=False)["input_ids"]], 128, tokenizer.eos_token_id)
    rows = rows[: 8 * (steps + 1)]
    found = compute_topk(teacher, rows, topk, 2.0, bf16=True)
    columns = {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows}
    dataset = FeatureDataset(
        columns, {"teacher_topk_indices": found["indices"], "teacher_topk_logprobs": found["logprobs"]}
    )
    collate = PadCollator(tokenizer.eos_token_id, {"labels": -100, "attention_mask": 0})
    cached = [collate([dataset[j] for j in range(i * 8, i * 8 + 8)]) for i in range(len(rows) // 8)]
    online = [{k: v for k, v in b.items() if not k.startswith("teacher_")} for b in cached]
    student = keep_layers(teacher, middle_block(30, 24))
    student.get_input_embeddings().requires_grad_(False)
    return teacher, student, cached, online


def lm_step_peak(variant: str, topk: int = 64, steps: int = 2) -> dict[str, Any]:
    """Peak memory of one kind of chapter 3 step, in its own process: above what the process
    holds after a first step (models, data, the optimizer's state), over `steps` more steps."""
    from kdlib.lm_trainer import LMDistillationTrainer

    teacher, student, cached, online = _lm_setup(steps, topk)
    source = cached if variant == "cached" else online
    with tempfile.TemporaryDirectory() as tmp:
        trainer = LMDistillationTrainer(
            model=student,
            args=_lm_args(tmp, variant != "clm"),
            teacher_model=teacher if variant == "online" else None,
        )
        optimizer = trainer.create_optimizer()
        _train_step(trainer, student, optimizer, dict(source[0]), True)
        reset_peak()
        base = current_mb()
        for batch in source[1 : steps + 1]:
            _train_step(trainer, student, optimizer, dict(batch), True)
        rss = peak_mb() - base
        tensors = tensor_peak_mb(lambda: _train_step(trainer, student, optimizer, dict(source[1]), True))
        return {"peak_above_mb": rss, "tensor_peak_mb": tensors}


def lm_memory(topk: int = 64) -> dict[str, Any]:
    """Peak step memory of online KD and cached top-k KD against the next-token step's."""
    runs = {v: in_own_process(lm_step_peak, v, topk) for v in ("clm", "online", "cached")}
    peaks = {v: run["peak_above_mb"] for v, run in runs.items()}
    tensors = {v: run["tensor_peak_mb"] for v, run in runs.items()}
    return {
        "peak_above_mb": peaks,
        "online_over_clm": peaks["online"] / peaks["clm"],
        "cached_over_clm": peaks["cached"] / peaks["clm"],
        "tensor_peak_mb": tensors,
        "tensors_online_over_clm": tensors["online"] / tensors["clm"],
        "tensors_cached_over_clm": tensors["cached"] / tensors["clm"],
    }


def lm_steps(steps: int, topk: int = 64) -> dict[str, Any]:
    from kdlib.lm import token_divergence, topk_forward_kl, topk_teacher
    from kdlib.lm_trainer import LMDistillationTrainer

    teacher, student, cached, online = _lm_setup(steps, topk)
    names = ("clm", "online", "cached", "clm_fp32", "cached_fp32")
    models = {name: copy.deepcopy(student) for name in names}
    losses: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            "clm": LMDistillationTrainer(model=models["clm"], args=_lm_args(tmp, False)),
            "online": LMDistillationTrainer(
                model=models["online"], args=_lm_args(tmp, True), teacher_model=teacher
            ),
            "cached": LMDistillationTrainer(model=models["cached"], args=_lm_args(tmp, True)),
            "clm_fp32": LMDistillationTrainer(model=models["clm_fp32"], args=_lm_args(tmp, False)),
            "cached_fp32": LMDistillationTrainer(model=models["cached_fp32"], args=_lm_args(tmp, True)),
        }
        optimizers = {name: trainer.create_optimizer() for name, trainer in trainers.items()}

        def forward(i: int) -> None:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                teacher(input_ids=online[i % len(online)]["input_ids"])

        def step(name: str, source: list[dict]) -> Callable[[int], Any]:
            def call(i: int) -> None:
                bf16 = not name.endswith("_fp32")
                batch = source[i % len(source)]
                losses[name] = _train_step(trainers[name], models[name], optimizers[name], batch, bf16)

            return call

        seconds = interleaved(
            {
                "clm_step": step("clm", online),
                "teacher_forward_bf16": forward,
                "online_kd_step": step("online", online),
                "cached_topk_kd_step": step("cached", cached),
                "clm_step_fp32": step("clm_fp32", online),
                "cached_topk_kd_step_fp32": step("cached_fp32", cached),
            },
            steps,
        )
    bf16 = precision_comparison(  # bf16 is the book's setting here; the _fp32 runs are the others
        {
            "clm": (
                (seconds["clm_step_fp32"], losses["clm_fp32"]),
                (seconds["clm_step"], losses["clm"]),
            ),
            "cached_topk_kd": (
                (seconds["cached_topk_kd_step_fp32"], losses["cached_fp32"]),
                (seconds["cached_topk_kd_step"], losses["cached"]),
            ),
        }
    )
    batch = online[0]["input_ids"]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        t_logits, s_logits = teacher(input_ids=batch).logits.float(), student(input_ids=batch).logits.float()
    kept = {}
    for t in (1.0, 2.0):
        indices, log_p = topk_teacher(t_logits, topk, t)
        kept[f"T={t:g}"] = {
            "mass": float(log_p.exp().sum(-1).mean()),
            "kl_share": float(
                topk_forward_kl(s_logits, indices, log_p, t) / token_divergence(s_logits, t_logits, t)
            ),
        }
    vocab = t_logits.shape[-1]
    return {
        "seconds": seconds,
        "online_over_limit": seconds["online_kd_step"]
        / (seconds["clm_step"] + seconds["teacher_forward_bf16"]),
        "cached_over_plain": seconds["cached_topk_kd_step"] / seconds["clm_step"],
        "bf16": bf16,
        "cache_bytes_per_token": {"full_vocabulary_fp16": 2 * vocab, f"top{topk}": 6 * topk},
        "topk_keeps": kept,
    }


# --- layer distillation (chapter 2) ------------------------------------------------------------

LAYER_SHAPES = {
    # teacher layers k, student layers m, batch, tokens, width
    "chapter 2 (4 of MPNet's 12 into MiniLM-L6, 32 sentences of 64 tokens)": (4, 6, 32, 64, 768),
    "CoFi's paper (4 of BERT-base's 12 into 12, 32 x 128 tokens)": (4, 12, 32, 128, 768),
}


def _five_d_matrix(
    teacher: list[torch.Tensor], student: list[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """The layer-loss matrix as kdlib computed it before: every pair's difference at once."""
    diff = torch.stack(teacher)[:, None] - torch.stack(student)[None]  # [k, m, batch, seq, width]
    sq = diff.pow(2).mean(dim=-1)
    weights = mask.to(sq.dtype)
    return (sq * weights).sum(dim=(-2, -1)) / weights.sum()


def _layer_inputs(shape: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    k, m, batch, seq, width = shape
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(batch, seq, width, generator=g) for _ in range(k)]
    student = [torch.randn(batch, seq, width, generator=g).requires_grad_() for _ in range(m)]
    mask = torch.ones(batch, seq)
    mask[: batch // 2, seq // 2 :] = 0  # half the rows padded to half length
    return teacher, student, mask


def layer_matrix_pass(shape: tuple[int, ...], formulation: str, repeats: int) -> dict[str, Any]:
    """Forward and backward of the layer-loss matrix, in its own process: median seconds, peak
    memory above the inputs, and the matrix and one gradient for the comparison."""
    from kdlib.alignment import layer_loss_matrix

    compute = {"five_d": _five_d_matrix, "kdlib": layer_loss_matrix}[formulation]
    teacher, student, mask = _layer_inputs(shape)
    upstream = torch.linspace(0.5, 1.5, shape[0] * shape[1]).reshape(shape[0], shape[1])
    times = []
    reset_peak()
    before = peak_mb()
    for _ in range(repeats):
        started = time.perf_counter()
        matrix = compute(teacher, student, mask)
        (grad,) = torch.autograd.grad((matrix * upstream).sum(), student[0])
        times.append(time.perf_counter() - started)
    return {
        "seconds": statistics.median(times),
        "peak_above_inputs_mb": peak_mb() - before,
        "matrix": matrix.detach().tolist(),
        "grad_sample": grad.flatten()[:4096].tolist(),
    }


def _relative(reference: list, other: list) -> float:
    a, b = torch.tensor(reference), torch.tensor(other)
    return float((a - b).abs().max() / a.abs().max())


def layer_matrix(repeats: int = 3) -> dict[str, Any]:
    """The 5-D formulation against kdlib's at chapter 2's shape and CoFi's: time, peak memory,
    and the largest relative difference of the matrix and of a gradient."""
    report = {}
    for name, shape in LAYER_SHAPES.items():
        old = in_own_process(layer_matrix_pass, shape, "five_d", repeats)
        new = in_own_process(layer_matrix_pass, shape, "kdlib", repeats)

        report[name] = {
            "seconds": {"five_d": old["seconds"], "kdlib": new["seconds"]},
            "peak_above_inputs_mb": {
                "five_d": old["peak_above_inputs_mb"],
                "kdlib": new["peak_above_inputs_mb"],
            },
            "memory_ratio": new["peak_above_inputs_mb"] / max(old["peak_above_inputs_mb"], 1e-9),
            "time_ratio": new["seconds"] / old["seconds"],
            "matrix_max_relative_difference": _relative(old["matrix"], new["matrix"]),
            "gradient_max_relative_difference": _relative(old["grad_sample"], new["grad_sample"]),
        }
    return report


# --- the layer-distillation step (chapter 2) -------------------------------------------------

SENTENCE_BATCH = 32  # chapters 2 and 4: 32 sentences of at most 64 tokens per step


def _sentence_batches(
    columns: dict[str, list], pad_token_id: int, count: int, extra: dict | None = None
) -> list:
    """The first `count` batches of `SENTENCE_BATCH` examples of `columns`, padded per batch as
    the chapters' collator pads them; `extra` (per-token teacher outputs) rides along."""
    from kdlib.batching import FeatureDataset, PadCollator

    dataset = FeatureDataset(columns, extra=extra)
    collate = PadCollator(pad_token_id)
    return [
        collate([dataset[j] for j in range(i * SENTENCE_BATCH, (i + 1) * SENTENCE_BATCH)])
        for i in range(count)
    ]


def layer_steps(steps: int) -> dict[str, Any]:
    """Chapter 2's layer-distillation step on the teacher's cached outputs (the chapter's only
    setting) against its limit, the student's own KD step returning its hidden states, in
    float32 and under bf16 autocast. The layer step adds the learned width projection and the
    `[4 x 6]` layer-loss matrix. Teacher MPNet-12 and student MiniLM-L6 as the chapter loads them
    (the teacher not fine-tuned: the cost is the same). There is no online variant: MPNet's
    vocabulary (30,527 ids) is not MiniLM's (30,522), so the trainer refuses a live teacher, and
    the chapter computes the teacher's states once, with its own tokenizer.
    """
    from kdlib.cache import TeacherOutputCache
    from kdlib.classification import encode, load_classifier
    from kdlib.data import load_sst2
    from kdlib.layer_distillation import (
        LayerDistillationArguments,
        LayerDistillationTrainer,
        add_projection,
        cached_teacher_states,
    )
    from kdlib.trainer import DistillationArguments, DistillationTrainer, quiet_arguments

    class WithHidden(DistillationTrainer):
        def forward_kwargs(self) -> dict[str, Any]:
            return {"output_hidden_states": True}

    torch.manual_seed(0)
    teacher, _ = load_classifier("mpnet-12")
    teacher.eval()
    student, tokenizer = load_classifier("minilm-l6")
    add_projection(student, teacher.config.hidden_size)
    columns = encode(tokenizer, load_sst2("train")[: (steps + 1) * SENTENCE_BATCH], 64)
    pad = tokenizer.pad_token_id
    with tempfile.TemporaryDirectory() as tmp:
        found = cached_teacher_states(teacher, columns, pad, TeacherOutputCache(tmp))
        extra = {"teacher_hidden_states": found["teacher_hidden_states"]}
        cached = _sentence_batches(
            dict(columns, teacher_logits=found["teacher_logits"]), pad, steps + 1, extra
        )

        def arguments(cls: type, **extra_args: Any) -> Any:
            return quiet_arguments(
                cls,
                output_dir=tmp,
                temperature=2.0,
                alpha_ce=0.9,
                alpha_task=0.0,
                use_cpu=not torch.cuda.is_available(),
                **extra_args,
            )

        layer = dict(layer_weight=0.1, teacher_layers=[2, 5, 8, 11], matching="ordered")
        names = ("student", "cached_layer", "student_bf16", "cached_layer_bf16")
        models = {name: copy.deepcopy(student) for name in names}
        trainers = {
            "student": WithHidden(model=models["student"], args=arguments(DistillationArguments)),
            "student_bf16": WithHidden(model=models["student_bf16"], args=arguments(DistillationArguments)),
            "cached_layer": LayerDistillationTrainer(
                model=models["cached_layer"], args=arguments(LayerDistillationArguments, **layer)
            ),
            "cached_layer_bf16": LayerDistillationTrainer(
                model=models["cached_layer_bf16"], args=arguments(LayerDistillationArguments, **layer)
            ),
        }
        optimizers = {name: trainer.create_optimizer() for name, trainer in trainers.items()}

        def step(name: str, source: list[dict], bf16: bool = False) -> Callable[[int], Any]:
            return lambda i: _train_step(
                trainers[name], models[name], optimizers[name], dict(source[i % len(source)]), bf16
            )

        seconds = interleaved(
            {
                "student_step": step("student", cached),
                "cached_layer_step": step("cached_layer", cached),
                "student_step_bf16": step("student_bf16", cached, True),
                "cached_layer_step_bf16": step("cached_layer_bf16", cached, True),
            },
            steps,
        )
    lengths = [b["input_ids"].shape[1] for b in cached]
    return {
        "seconds": seconds,
        "cached_over_student_step": seconds["cached_layer_step"] / seconds["student_step"],
        "cached_over_student_step_bf16": seconds["cached_layer_step_bf16"] / seconds["student_step_bf16"],
        "bf16_speedup_cached_layer_step": seconds["cached_layer_step"] / seconds["cached_layer_step_bf16"],
        "batches": f"{SENTENCE_BATCH} SST-2 sentences, padded lengths " + ", ".join(map(str, lengths)),
    }


# --- the module-replacement step (chapter 4) -------------------------------------------------


def theseus_steps(steps: int) -> dict[str, Any]:
    """Chapter 4's replacing steps against their limit: the predecessor's forward (inference) plus
    the successor's own training step (the extracted 3-layer model, only its layers trainable).

    Binary replacement at p = 0.5 runs, per group, either the successor (trained) or the frozen
    predecessor layers, through which the gradient of every earlier successor must still flow
    back; proportional add runs both in every group. Banking77, MiniLM-L6 as the chapter loads it
    (its predecessor not fine-tuned: the cost is the same). Binary draws are seeded; each step's
    median is over the same draws in every run of the benchmark.

    What proportional add cannot avoid is also measured: the predecessor's forward *and* the
    backward through its frozen layers (the gradient every earlier successor needs), timed as a
    forward and backward to the embeddings' output with the layers' weights frozen.
    """
    from kdlib.classification import encode, load_classifier
    from kdlib.data import load_banking77
    from kdlib.theseus import (
        BernoulliReplacement,
        ProportionalAdd,
        TheseusTrainer,
        build_theseus,
        extract_successor,
    )
    from kdlib.trainer import DistillationArguments, forward_inputs, quiet_arguments

    torch.manual_seed(0)
    predecessor, tokenizer = load_classifier("minilm-l6", 77)
    predecessor.eval()
    rows = load_banking77("train")[: (steps + 1) * SENTENCE_BATCH]
    batches = _sentence_batches(encode(tokenizer, rows, 64), tokenizer.pad_token_id, steps + 1)
    models = {}
    for precision in ("", "_bf16"):  # each precision trains its own copies from the same weights
        binary, proportional, successor = (copy.deepcopy(predecessor) for _ in range(3))
        build_theseus(binary, 3, BernoulliReplacement(0.5))
        build_theseus(proportional, 3, ProportionalAdd(0.5))
        build_theseus(successor, 3, ProportionalAdd(0.5))
        successor = extract_successor(successor)  # the successors alone, the rest frozen as in training
        models |= {
            f"successor{precision}": successor,
            f"binary{precision}": binary,
            f"proportional{precision}": proportional,
        }
    losses: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        args = quiet_arguments(
            DistillationArguments,
            output_dir=tmp,
            alpha_ce=0.0,
            alpha_task=1.0,
            use_cpu=not torch.cuda.is_available(),
        )
        trainers = {name: TheseusTrainer(model=model, args=args) for name, model in models.items()}
        optimizers = {name: trainer.create_optimizer() for name, trainer in trainers.items()}

        def step(name: str) -> Callable[[int], Any]:
            def call(i: int) -> None:
                torch.manual_seed(i)  # the same coin flips and dropout for step i in every run
                batch = dict(batches[i % len(batches)])
                bf16 = name.endswith("_bf16")
                losses[name] = _train_step(trainers[name], models[name], optimizers[name], batch, bf16)

            return call

        def forward(i: int) -> None:
            with torch.inference_mode():
                predecessor(**forward_inputs(predecessor, batches[i % len(batches)], labels=False))

        through = copy.deepcopy(predecessor).requires_grad_(False)

        def forward_backward(i: int) -> None:
            batch = batches[i % len(batches)]
            embedded = through.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
            out = through(inputs_embeds=embedded, attention_mask=batch["attention_mask"])
            out.logits.sum().backward()

        seconds = interleaved(
            {
                "successor_step": step("successor"),
                "predecessor_forward": forward,
                "predecessor_forward_backward": forward_backward,
                "binary_step": step("binary"),
                "proportional_step": step("proportional"),
                "successor_step_bf16": step("successor_bf16"),
                "binary_step_bf16": step("binary_bf16"),
                "proportional_step_bf16": step("proportional_bf16"),
            },
            steps,
        )
    limit = seconds["successor_step"] + seconds["predecessor_forward"]
    return {
        "seconds": seconds,
        "bf16": precision_comparison(
            {
                kind: (
                    (seconds[f"{kind}_step"], losses[kind]),
                    (seconds[f"{kind}_step_bf16"], losses[f"{kind}_bf16"]),
                )
                for kind in ("successor", "binary", "proportional")
            }
        ),
        "binary_over_limit": seconds["binary_step"] / limit,
        "proportional_over_limit": seconds["proportional_step"] / limit,
        "proportional_over_its_own_limit": seconds["proportional_step"]
        / (seconds["successor_step"] + seconds["predecessor_forward_backward"]),
        "binary_idle_steps": trainers["binary"].idle_steps,
        "batches": f"{SENTENCE_BATCH} Banking77 queries, padded lengths "
        + ", ".join(str(b["input_ids"].shape[1]) for b in batches),
    }
