"""The train stage's data path before issue 16, kept only to measure against (benchmarks/scale.py) and to check
that the Arrow file gives the same training (tests/test_train_data.py).

    LegacyRows(spec, teach_folder)  -> the object run_train takes in place of a TrainingData

The driver turns every teacher vector into a tuple of Python floats (workflows.train.rows_from_targets), hands all
rows to Ray Data with from_items, and every worker pulls all of them into a list of dicts sorted by id, tokenises
all of them and, with center_targets, computes the mean over all of them.
"""

from __future__ import annotations

from typing import Any

from components.spec import Spec
from components.training import Row, centered_targets, mean_target, split_holdout


def _dataset(rows: list[Row]):
    import ray.data

    dataset = ray.data.from_items([row.__dict__ | {"teacher": list(row.teacher)} for row in rows])
    dataset.context.enable_progress_bars = False
    return dataset


class LegacyRows:
    """Rows in memory on the driver; Ray datasets for the workers. Pickled without its rows (they go by Ray Data)."""

    def __init__(self, rows: list[Row], dimension: int, fingerprint: str):
        self.rows, self.dimension, self.fingerprint = rows, dimension, fingerprint
        self.has_holdout = False

    @classmethod
    def from_teach_output(cls, folder) -> LegacyRows:
        from workflows.train import rows_from_targets

        return cls(*rows_from_targets(folder))

    def __getstate__(self) -> dict[str, Any]:
        return {"rows": None, "dimension": self.dimension, "fingerprint": self.fingerprint, "has_holdout": self.has_holdout}

    def train_mean(self, spec: Spec) -> None:
        return None  # computed by every worker over every row, as before

    def trainer_datasets(self, spec: Spec) -> dict:
        train, holdout = split_holdout(self.rows, spec.data.holdout_fraction)
        self.has_holdout = bool(holdout)
        return {"train": _dataset(train)} | ({"holdout": _dataset(holdout)} if holdout else {})

    def open(self, spec: Spec, model, mean=None) -> LegacyView:
        return LegacyView(spec, model, self.has_holdout)


class LegacyView:
    def __init__(self, spec: Spec, model, has_holdout: bool):
        import ray.train

        rows = sorted(ray.train.get_dataset_shard("train").iter_rows(), key=lambda row: row["id"])
        self.lengths = model.token_lengths([r["query"] for r in rows], [r["response"] for r in rows],
                                           spec.training.max_response_tokens)
        holdout = sorted(ray.train.get_dataset_shard("holdout").iter_rows(), key=lambda row: row["id"]) if has_holdout else []
        if spec.loss.center_targets:
            mean = mean_target(rows)
            rows, holdout = centered_targets(rows, mean), centered_targets(holdout, mean)
        self.rows, self.holdout = rows, holdout

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, positions):
        chosen = [self.rows[i] for i in positions]
        return [r["query"] for r in chosen], [r["response"] for r in chosen], [r["teacher"] for r in chosen]

    def holdout_rows(self) -> list[dict]:
        return self.holdout
