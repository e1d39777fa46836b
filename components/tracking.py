"""MLflow: where runs are tracked, the spec as params, and the model registry (`models:/<name>/<version>`).

Local by default: a SQLite store and an artifact folder inside the run folder. MLFLOW_TRACKING_URI or
`tracking.tracking_uri` in the spec switch to a server.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from components.spec import Spec

PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")
REQUIREMENTS = ["torch>=2.13", "transformers>=5.24", "safetensors", "pydantic>=2", "pyyaml", "numpy", "gguf", "accelerate"]


def tracking_uri(spec: Spec) -> str:
    if spec.tracking.tracking_uri:
        return spec.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return local_store(spec)


def local_store(spec: Spec) -> str:
    """One machine only: on a cluster (or with the run folder on object storage) a tracking server is required, so
    that no worker ever writes a SQLite file (workflows.run refuses before the first stage)."""
    return f"sqlite:///{(spec.run_dir / 'mlflow.db').resolve()}"


def start_run(spec: Spec, run_name: str, run_id: str | None = None, parent_run_id: str | None = None):
    """Open (or reopen, on resume) the MLflow run for a training, with the spec's experiment."""
    import mlflow

    spec.run_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(spec)
    # (set_tracking_uri also exports MLFLOW_TRACKING_URI, so "is the store local" is decided by the URI itself.)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(spec.tracking.experiment)
    if experiment is None:
        # With the local store, artifacts live beside it in the run folder instead of ./mlruns of the caller.
        location = (spec.run_dir / "mlartifacts").resolve().as_uri() if uri == local_store(spec) else None
        experiment_id = mlflow.create_experiment(spec.tracking.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
    return mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id, run_name=run_name, tags=tags)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"training": {"lr": 1}} -> {"training.lr": "1"}; MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def log_and_register_model(model_dir: Path, spec: Spec, run_id: str) -> tuple[str, str | None]:
    """Log the model folder; with tracking.registered_model_name also log it as an MLflow pyfunc model (code,
    not pickle) and register it. Returns (a URI that resolve_model loads, the registered version or None)."""
    import mlflow

    mlflow.log_artifacts(str(model_dir), "model_folder")
    if not spec.tracking.registered_model_name:
        return f"runs:/{run_id}/model_folder", None
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_CODE),
        artifacts={"model_dir": str(model_dir)},
        code_paths=[str(PYFUNC_CODE.parent)],  # the `components` package travels with the model
        pip_requirements=REQUIREMENTS,  # stated, not inferred (inference starts a subprocess per log)
        registered_model_name=spec.tracking.registered_model_name,
    )
    return f"models:/{spec.tracking.registered_model_name}/{info.registered_model_version}", str(info.registered_model_version)


def download_registered_model(uri: str) -> Path:
    """The local model folder behind `models:/<name>/<version>` (or any MLflow model URI)."""
    import mlflow

    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    for candidate in [root, *sorted(root.glob("artifacts/*"))]:
        if (candidate / "llm2vec_gen.json").is_file():
            return candidate
    raise FileNotFoundError(f"{uri}: no LLM2Vec-Gen model folder inside the downloaded artifacts at {root}")


def resolve_model(reference: str | os.PathLike) -> Path:
    """A model folder path, an MLflow `models:/` / `runs:/` URI downloaded to a local folder, or a folder on shared
    storage (s3://...: components/storage.py) staged on this node."""
    text = str(reference)
    if text.startswith(("models:/", "runs:/")):
        return download_registered_model(text)
    from components.storage import is_uri, staged

    if is_uri(text):
        return staged(text, "model-" + hashlib.sha256(text.encode()).hexdigest()[:16])
    return Path(text)
