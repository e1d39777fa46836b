"""The environment every Ray worker needs from the driver's: the Hugging Face token and hub cache location.

A gated backbone (meta-llama/...) is read on every worker that loads it (generation and teacher actors, Ray Train
workers), and those are started by each node's raylet with the node's environment, not the driver's: an `HF_TOKEN`
exported where `python -m workflows.run` (or `ray job submit`) runs reaches no worker on another node, and neither
does an `HF_HOME` pointing the hub cache at shared storage. `connect` starts or joins Ray with those variables in the
job's runtime_env, so that every task and actor of the job, Ray Data's and Ray Train's included, has them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

# The hub's credentials, cache locations, endpoint and offline switches (huggingface_hub, datasets, transformers).
HUB_ENV_VARS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",  # the older name of HF_TOKEN, still read by huggingface_hub
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_DATASETS_CACHE",
    "HF_ENDPOINT",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
)
# Where a job submitted with `ray job submit` finds its own runtime_env (ray._private.runtime_env.constants).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def worker_env_vars(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The hub variables set in `environ` (default os.environ) that the job's runtime_env does not set already.

    Ray refuses to merge a ray.init runtime_env into a submitted job's when both name the same variable, so one that
    `ray job submit --runtime-env-json` already passes is left to it.
    """
    environ = os.environ if environ is None else environ
    job_config = json.loads(environ.get(JOB_CONFIG_ENV) or "{}")
    already = (job_config.get("runtime_env") or {}).get("env_vars") or {}
    return {name: environ[name] for name in HUB_ENV_VARS if environ.get(name) and name not in already}


def connect(**init_kwargs: Any) -> None:
    """ray.init (the cluster named by RAY_ADDRESS, else a local one) with the hub variables in the job's
    runtime_env; nothing when Ray is already initialised (its job's environment was fixed by whoever started it)."""
    import ray

    if ray.is_initialized():
        return
    env_vars = worker_env_vars()
    runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
    if env_vars:
        runtime_env["env_vars"] = {**env_vars, **runtime_env.get("env_vars", {})}
    init_kwargs.setdefault("address", os.environ.get("RAY_ADDRESS"))
    ray.init(runtime_env=runtime_env or None, **init_kwargs)
