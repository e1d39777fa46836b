"""Where the evaluation actor runs and how many threads it computes with (components/evaluation/remote.py)."""

import os

from components.evaluation.remote import evaluation_resources, torch_threads
from components.spec import load_spec


def tiny(**evaluation):
    spec = load_spec("specs/tiny.yaml")
    return spec.model_copy(update={"evaluation": spec.evaluation.model_copy(update=evaluation)})


def test_unset_cpus_reserve_one_and_compute_on_every_core_without_a_gpu():
    spec = tiny()
    assert evaluation_resources(spec) == {"num_cpus": 1, "num_gpus": 0}
    assert torch_threads(spec.evaluation.num_cpus, 0) == len(os.sched_getaffinity(0))


def test_a_gpu_evaluation_leaves_torch_threads_alone():
    assert torch_threads(None, 1) is None


def test_set_cpus_are_reserved_and_used():
    spec = tiny(num_cpus=3, num_gpus=0.5)
    assert evaluation_resources(spec) == {"num_cpus": 3, "num_gpus": 0.5}
    assert torch_threads(3, 0.5) == 3
    assert torch_threads(0, 0) == 1  # a zero reservation still computes with one thread
