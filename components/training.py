"""Pieces of the training loop that are plain functions: batching, the LR schedule, DeepSpeed's config, metrics.

The loop itself (Ray Train + DeepSpeed + MLflow) is in workflows/train.py.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from components.spec import LossSpec, TrainingSpec


@dataclass(frozen=True)
class Row:
    """One training example: a query, the frozen LLM's response to it, and the teacher's vector of the response."""

    id: str
    query: str
    response: str
    teacher: tuple[float, ...]


def split_holdout(rows: list[Row], fraction: float) -> tuple[list[Row], list[Row]]:
    """(train, held out): the round(fraction * n) rows (at least one) whose id hashes lowest.

    Hashing ids keeps the choice independent of row order and stable across runs.
    """
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    count = max(1, round(fraction * len(rows)))
    ranked = sorted(rows, key=lambda row: hashlib.sha1(row.id.encode()).hexdigest())
    held = {row.id for row in ranked[:count]}
    return [row for row in rows if row.id not in held], [row for row in rows if row.id in held]


def micro_batches(lengths: list[int], micro_batch_size: int, seed: int, epoch: int, group: int = 32) -> list[list[int]]:
    """Row indices in micro batches for one epoch, grouped by length so that little compute goes to padding.

    Rows are shuffled, cut into windows of `group` micro batches, sorted by length inside each window, cut
    into micro batches, and the micro batches shuffled: random order, similar lengths within a batch. The
    result depends only on (lengths, seed, epoch), so a resumed run sees exactly the batches it would have.
    A last incomplete micro batch is dropped so that every optimizer step has the same batch size.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = micro_batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + micro_batch_size] for i in range(0, len(chunk), micro_batch_size)]
    batches = [batch for batch in batches if len(batch) == micro_batch_size]
    rng.shuffle(batches)
    return batches


def batch_schedule(lengths: list[int], spec: TrainingSpec, rank: int, world_size: int):
    """Yield (step, micro_index, row indices) for this worker, from step 0 on, epoch after epoch.

    Global micro batch g goes to worker g % world_size; each optimizer step consumes
    grad_accumulation * world_size global micro batches.
    """
    per_step = spec.grad_accumulation * world_size
    epoch, position, batches = 0, 0, micro_batches(lengths, spec.micro_batch_size, spec.seed, 0)
    if len(batches) < per_step:
        raise ValueError(
            f"training.batch_size {spec.batch_size} needs at least {spec.batch_size} rows, got {len(lengths)}"
        )
    step = 0
    while True:
        for micro in range(spec.grad_accumulation):
            if position + per_step > len(batches):
                epoch, position = epoch + 1, 0
                batches = micro_batches(lengths, spec.micro_batch_size, spec.seed, epoch)
            yield step, micro, batches[position + micro * world_size + rank]
        position += per_step
        step += 1


def lr_factor(step: int, warmup_steps: int, schedule_steps: int, kind: str = "cosine") -> float:
    """The LR multiplier at optimizer step `step` (0-based) of a `schedule_steps`-long schedule (the stop step may come
    earlier).

    linear:   transformers' get_linear_schedule_with_warmup, the official schedule (lr_scheduler_type linear):
              step / warmup during the warmup (step 0 at 0), then a straight line to 0 at schedule_steps
    cosine:   (step + 1) / warmup during the warmup (the first step already learns), then a half cosine to 0
    constant: the same warmup as cosine, then 1
    """
    if kind == "linear":
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (schedule_steps - step) / max(1, schedule_steps - warmup_steps))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind != "cosine":
        raise ValueError(f"training.schedule: unknown kind {kind!r} (linear, cosine or constant)")
    progress = min(1.0, (step - warmup_steps) / max(1, schedule_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(spec: TrainingSpec) -> dict:
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accumulation,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": {"stage": spec.zero_stage},
        "bf16": {"enabled": spec.precision == "bf16"},
        # We hand DeepSpeed a plain torch AdamW: the fused DeepSpeed optimizers need a GPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@torch.no_grad()
def embedding_metrics(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """In-batch agreement of student and teacher embeddings, and a collapse signal.

    cos_positive: mean cos(e_i, t_i); cos_negative: mean cos(e_i, t_j), i != j; cos_student_pairs: mean
    cos(e_i, e_j), i != j (near 1 means every text gets the same embedding: collapse).
    """
    s, t = F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1)
    cross, self_similarity = s @ t.T, s @ s.T  # (B, B)
    batch = student.shape[0]
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=student.device)
    return {
        "cos_positive": cross.diagonal().mean().item(),
        "cos_negative": cross[off_diagonal].mean().item() if batch > 1 else float("nan"),
        "cos_student_pairs": self_similarity[off_diagonal].mean().item() if batch > 1 else float("nan"),
        "student_norm": student.float().norm(dim=-1).mean().item(),
        "teacher_norm": teacher.float().norm(dim=-1).mean().item(),
    }


def centered_targets(rows: list[dict], mean: list[float]) -> list[dict]:
    """Rows whose teacher vector has `mean` (the training rows' mean target) subtracted: see LossSpec.center_targets."""
    return [row | {"teacher": [value - offset for value, offset in zip(row["teacher"], mean, strict=True)]} for row in rows]


def mean_target(rows: list[dict]) -> list[float]:
    return np.asarray([row["teacher"] for row in rows], dtype=np.float64).mean(0).tolist()


@torch.no_grad()
def retrieval_accuracy(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Share of rows whose own teacher vector is the nearest (cosine) of all the rows' teacher vectors.

    Unlike the mean cosine to its own target, this cannot be met by predicting the average answer: it
    measures whether embeddings tell answers apart, which is what retrieval and STS ask of them. Both sides
    are centred on their own mean first, so runs trained on centred and on raw targets (which differ by a
    constant offset) are scored alike.
    """
    student, teacher = student.float(), teacher.float()
    student, teacher = student - student.mean(0), teacher - teacher.mean(0)
    similarity = F.normalize(student, dim=-1) @ F.normalize(teacher, dim=-1).T
    hits = similarity.argmax(dim=1) == torch.arange(student.shape[0], device=student.device)
    return hits.float().mean().item()


@torch.no_grad()
def holdout_metrics(model, rows: list[dict], spec: TrainingSpec, loss: LossSpec) -> dict[str, float]:
    """Losses and agreement on held-out rows: the proxy that sweeps and settings are chosen by."""
    totals = {"reconstruction_loss": 0.0, "alignment_loss": 0.0}
    students, teachers, count = [], [], 0
    for start in range(0, len(rows), spec.micro_batch_size):
        chunk = rows[start : start + spec.micro_batch_size]
        batch = model.collate([r["query"] for r in chunk], [r["response"] for r in chunk], [r["teacher"] for r in chunk], spec.max_response_tokens)
        losses = model(batch, loss)
        totals["reconstruction_loss"] += losses.reconstruction.item() * len(chunk)
        totals["alignment_loss"] += losses.alignment.item() * len(chunk)
        students.append(losses.embedding)
        teachers.append(batch.teacher)
        count += len(chunk)
    students, teachers = torch.cat(students), torch.cat(teachers)
    agreement = embedding_metrics(students, teachers) | {"retrieval_accuracy": retrieval_accuracy(students, teachers)}
    return {f"holdout_{key}": value / count for key, value in totals.items()} | {
        f"holdout_{key}": value for key, value in agreement.items()
    }


def decoded_samples(model, rows: list[dict], max_new_tokens: int = 32) -> str:
    """What a few held-out queries' compression vectors decode to, next to the response they should resemble."""
    if not rows:
        return ""
    decoded = model.decode([r["query"] for r in rows], max_new_tokens=max_new_tokens)
    return "\n\n".join(
        f"query:    {r['query']}\nresponse: {r['response'][:300]}\ndecoded:  {text}" for r, text in zip(rows, decoded, strict=True)
    )
