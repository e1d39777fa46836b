"""Which evaluation a run can do where it is: `evaluation.suite: auto`, the embedded default's choice.

A fresh clone of the repository has no `../shared/data`, and a machine may or may not reach the Hugging Face hub.
The rule, task by task over the local suite:

    its files are under evaluation.data_dir    -> the local task (offline)
    else, the hub is reachable and mteb has a public copy of the same task -> that public MTEB task
    else                                       -> left out

and when nothing is left, the evaluation is skipped with one line saying why, so that the job still succeeds.
The chosen line ("local suite: 9 tasks from ../shared/data", ...) goes into the run's summary.

No mteb import here (as in suites.py): the choice decides whether the libraries may go online before they load.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from components.evaluation.suites import LOCAL_TASKS

# The files each local task reads, relative to data_dir (components/evaluation/tasks.py and safety.py).
LOCAL_FILES: dict[str, tuple[str, ...]] = {
    "LocalSTSBenchmark": ("stsbenchmark/sts-test.csv",),
    "LocalSICK-R": ("sick/SICK_test_annotated.txt",),
    "LocalBanking77": ("banking77/train.csv", "banking77/test.csv"),
    "LocalEmotion": ("emotion/train.txt", "emotion/test.txt"),
    "LocalStackOverflowClustering": ("stc2_clustering/StackOverflow.txt", "stc2_clustering/StackOverflow_gnd.txt"),
    "LocalMRPC": ("mrpc/msr-para-test.tsv",),
    "LocalTrecQA": ("trecqa_wang/test.csv",),
    "LocalSciFact": ("scifact/corpus.jsonl", "scifact/queries.jsonl", "scifact/qrels/test.tsv"),
    "AdvBenchIR": (
        "advbench_ir/advbench-ir.jsonl",
        "advbench_ir/advbench-ir_chunked.jsonl",
        "scifact/corpus.jsonl",
        "alpaca_en_demo/alpaca_en_demo.json",
    ),
}

# The public MTEB task holding the same data as a local one (same source, same test split). STC2 StackOverflow
# clustering, MRPC, TREC-QA and our AdvBench-IR mix have no copy in mteb: without their files they are left out.
HUB_COPIES: dict[str, str] = {
    "LocalSTSBenchmark": "STSBenchmark",
    "LocalSICK-R": "SICK-R",
    "LocalBanking77": "Banking77Classification",
    "LocalEmotion": "EmotionClassification",
    "LocalSciFact": "SciFact",
}


def missing_files(task: str, data_dir: str | os.PathLike) -> list[str]:
    """The files of a local task that are not under data_dir (empty: the task can run)."""
    return [name for name in LOCAL_FILES[task] if not (Path(data_dir) / name).is_file()]


def hub_offline_by_env() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set to a true value: the user said not to go online."""
    return any(os.environ.get(key, "").strip().lower() in ("1", "true", "yes", "on")
               for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT, default huggingface.co) answers a TCP connection within timeout_s.

    False at once when the environment says offline; otherwise one connection attempt, no request is sent."""
    if hub_offline_by_env():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class SuiteChoice:
    """What `suite: auto` runs: `tasks` (empty: skipped), `kind` local | hub | mixed | skipped, and `line`, one line
    for the summary saying which evaluation ran and why."""

    tasks: list[str]
    kind: str
    line: str
    left_out: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> bool:
        return not self.tasks


def choose_auto_suite(
    data_dir: str | os.PathLike, online: Callable[[], bool] = hub_reachable, candidates: list[str] | None = None
) -> SuiteChoice:
    """The tasks `suite: auto` runs (see the module docstring), among `candidates` (local task names; default: the
    local suite). `online` is called only when some local task lacks its files, so a machine with the data never
    reaches for the network."""
    candidates = list(candidates or LOCAL_TASKS)
    local = [task for task in candidates if not missing_files(task, data_dir)]
    absent = [task for task in candidates if task not in local]
    if not absent:
        what = f"local suite: {len(local)} tasks" if local == LOCAL_TASKS else f"local tasks {', '.join(local)}"
        return SuiteChoice(local, "local", f"{what} from {data_dir} (offline)")
    reachable = online()
    hub = [HUB_COPIES[task] for task in absent if reachable and task in HUB_COPIES]
    left_out = [task for task in absent if not (reachable and task in HUB_COPIES)]
    tasks = local + hub
    if not tasks:
        return SuiteChoice(
            [], "skipped",
            f"evaluation skipped: no local task files under {data_dir} and the Hugging Face hub is not reachable "
            "(offline); put the datasets there (evaluation.data_dir) or run online for the public MTEB copies",
            left_out,
        )
    parts = []
    if local:
        parts.append(f"{len(local)} local tasks from {data_dir}")
    if hub:
        parts.append(f"{len(hub)} public MTEB tasks from the hub ({', '.join(hub)}; they run whole, "
                     "evaluation.limit applies to local tasks)")
    kind = "mixed" if local and hub else ("local" if local else "hub")
    suffix = f"; left out (no files{', no hub copy' if reachable else ', offline'}): {', '.join(left_out)}" if left_out else ""
    return SuiteChoice(tasks, kind, "auto suite: " + " + ".join(parts) + suffix, left_out)
