"""Evaluate an LLM2Vec-Gen model with mteb, optionally against its teacher and its backbone's own readouts.

    python -m workflows.evaluate MODEL [--suite local|mteb-lite|auto|TASK,...] [--baselines [--training-free A,B]]
                                       [--oracle] [--limit N]
                                       [--prompts bare|generative|FILE.json] [--output DIR] [--spec SPEC]
                                       [--teacher TEACHER] [--data-dir DIR] [--batch-size B] [--distractors-per-query K]
                                       [--hard-negatives-per-query K] [--oracle-dir DIR] [--tracking-uri URI [--run-id ID]]

MODEL is a model folder or an MLflow URI (models:/name/version, runs:/id/model_folder). The local suite reads every
dataset from --data-dir (default ../shared/data) and runs offline; mteb-lite downloads public MTEB tasks. With
--baselines the same tasks also run on the teacher the model was aligned to (model.config.teacher, or the spec's,
or --teacher), on the backbone's input-centric embeddings (mean pooling, last token), on its training-free prompt
readouts (PromptEOL, PromptEOL inside the chat template, Echo: components/evaluation/encoders.py) and, as the response oracle
(also alone with --oracle), on the teacher's embedding of the backbone's greedy answer to each text
(components/evaluation/oracle.py; answers cached by content in --oracle-dir, default the spec's
evaluation.oracle_dir, else runs/oracle). Without --limit every local task runs at full size, as MTEB runs the
same data; --limit N is the quick mode (tasks.py says how each task is sampled). Writes results.json,
results.md and scores.png into --output (default runs/evaluation/<model reference>), and logs the scores to MLflow
when a tracking URI is given. The evaluate stage of workflows.run calls the same `run_evaluation`.

Examples:
    python -m workflows.evaluate runs/smollm2-135m/train/model --baselines --limit 200
    python -m workflows.evaluate models:/smollm2-135m-llm2vec-gen/1 --suite LocalSciFact,AdvBenchIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.evaluation.availability import LOCAL_FILES, SuiteChoice, choose_auto_suite, hub_reachable
from components.evaluation.suites import SUITES, expand_suite, is_offline, needs_hub
from components.spec import EvaluationSpec, GenerationSpec, Spec, SpecError, TeacherSpec, load_spec

log = logging.getLogger("workflows.evaluate")


def suite_tasks(evaluation: EvaluationSpec) -> list[str]:
    """The spec's task list when given, else its suite's (suite auto: what resolve_auto chooses here)."""
    if evaluation.suite == "auto" and not evaluation.tasks:
        return suite_tasks(resolve_auto(evaluation)[0])
    return expand_suite(evaluation.tasks or evaluation.suite)


def resolve_auto(
    evaluation: EvaluationSpec, online: Callable[[], bool] | None = None
) -> tuple[EvaluationSpec, SuiteChoice | None]:
    """For `suite: auto` (over the local suite, or over `tasks` when they are local task names): the evaluation with
    the chosen tasks filled in (suite none when there is nothing to run) and the choice, whose line says which
    evaluation runs; any other spec as it is, and None."""
    if evaluation.suite != "auto" or not all(task in LOCAL_FILES for task in evaluation.tasks):
        return evaluation, None
    # With local task names, auto chooses among those (each local, else its hub copy, else left out).
    choice = choose_auto_suite(evaluation.data_dir, online or hub_reachable, evaluation.tasks or None)
    update = {"suite": "none", "tasks": []} if choice.skipped else {"tasks": choice.tasks}
    return evaluation.model_copy(update=update), choice


class HubUnreachable(RuntimeError):
    """The evaluation needs the Hugging Face hub and it cannot be reached; the message is one line saying so."""


def require_hub(task_names: list[str], online: Callable[[], bool] | None = None) -> None:
    """Raise HubUnreachable at once when some task downloads its data and the hub is not reachable (one probe)."""
    hub = needs_hub(task_names)
    if hub and not (online or hub_reachable)():
        shown = ", ".join(hub[:3]) + (f" and {len(hub) - 3} more" if len(hub) > 3 else "")
        raise HubUnreachable(
            f"evaluation needs the Hugging Face hub for {len(hub)} public task(s) ({shown}) and the hub is not "
            "reachable (offline or HF_HUB_OFFLINE set): run online, or use evaluation.suite local or auto"
        )


def preflight(evaluation: EvaluationSpec, online: Callable[[], bool] | None = None) -> str | None:
    """Why the evaluation cannot run here (one line), or None; workflows.run asks before its first stage, so that a
    job whose suite needs the hub fails at once instead of after training. Suite auto always can (it may skip)."""
    if evaluation.suite == "auto" and not evaluation.tasks:
        return None
    try:
        require_hub(suite_tasks(evaluation), online)
    except HubUnreachable as err:
        return str(err)
    return None


def go_offline() -> None:
    """Local tasks must never reach for the hub; the libraries read these when they are first imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def run_evaluation(
    model_ref: str | os.PathLike,
    evaluation: EvaluationSpec,
    output: Path,
    teacher: TeacherSpec | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    generation: GenerationSpec | None = None,
    oracle_dir: str | os.PathLike | None = None,
    prompts: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Evaluate the model (and, with evaluation.baselines, its teacher and backbone readouts; with the oracle, the
    teacher on the backbone's answers, generated with `generation`, default GenerationSpec(), and cached in
    `oracle_dir`, default evaluation.oracle_dir or runs/oracle) on the spec's tasks; write the report into `output`.
    Returns the report's JSON content plus the paths written.

    prompts: the model's instructions for this evaluation instead of its folder's: a named set (bare, generative) or
    a JSON file of a mapping (components/prompts.py); several, comma-separated, give one column each
    ("llm2vec-gen-bare", "llm2vec-gen-generative", ...) from one load of the model. The oracle asks with the one
    set given, else with the folder's prompts."""
    task_names = suite_tasks(evaluation)
    if not task_names:
        raise ValueError("no tasks to run: the suite is 'none' and evaluation.tasks is empty")
    if is_offline(task_names):
        go_offline()
    else:
        require_hub(task_names)

    from components.evaluation.encoders import BackboneReadouts, GenEmbedder, TeacherEmbedder, teacher_from_config
    from components.evaluation.report import log_to_mlflow, report_dict, write_report
    from components.evaluation.runner import evaluate_embedders
    from components.model import LLM2VecGen
    from components.teacher import load_teacher
    from components.tracking import resolve_model

    folder = resolve_model(model_ref)
    started = time.perf_counter()
    model = LLM2VecGen.load(folder, dtype=dtype)  # dtype, device: the evaluation actor's (remote.py)
    if device is not None:
        model.to(device)
    embedders: dict[str, Any] = {}
    descriptions: dict[str, str] = {}
    sets = prompt_set_names(prompts)
    oracle_prompts = model.config.prompts
    for name in sets:
        label = "llm2vec-gen" if len(sets) == 1 else f"llm2vec-gen-{Path(name).stem}"
        chosen = load_prompts(name) if name is not None else None
        if chosen is not None and len(sets) == 1:
            oracle_prompts = chosen
        embedders[label] = GenEmbedder(model, name=label, prompts=chosen)
        descriptions[label] = f"LLM2Vec-Gen model {folder} (" + (
            f"prompts: {name}, {len(chosen)} keys" if chosen is not None
            else f"prompts from its folder: {_describe_prompts(model.config.prompts)}") + ")"
    loaded_teacher = None
    if evaluation.baselines or evaluation.with_oracle:
        teacher = teacher or teacher_from_config(model.config.teacher)
        loaded_teacher = load_teacher(teacher, model.config.backbone)
        where = teacher.name or f"{teacher.package}/{teacher.path_in_package}"
    if evaluation.baselines:
        embedders["teacher"] = TeacherEmbedder(loaded_teacher)
        readouts = BackboneReadouts(model.backbone_info, max_tokens=model.config.max_query_tokens)
        descriptions["teacher"] = f"the teacher, {teacher.kind} {where if teacher.kind != 'backbone_mean_pool' else ''}".rstrip()
        if "mean-pool" in evaluation.training_free:
            embedders["mean-pool"] = readouts.embedder("mean")
            descriptions["mean-pool"] = "the backbone's last hidden states, masked mean over the bare text's tokens"
        if "last-token" in evaluation.training_free:
            embedders["last-token"] = readouts.embedder("last")
            descriptions["last-token"] = "the backbone's last hidden state at the bare text's last token"
        # The training-free prompt baselines (PromptEOL, its chat-template variant, Echo): issue 25.
        from components.evaluation.encoders import PROMPT_BASELINE_DESCRIPTIONS, prompt_baselines

        chosen = [name for name in PROMPT_BASELINE_DESCRIPTIONS if name in evaluation.training_free]
        for name, readout in prompt_baselines(model.backbone_info, model.config.max_query_tokens, chosen).items():
            embedders[name], descriptions[name] = readout, PROMPT_BASELINE_DESCRIPTIONS[name]
    if evaluation.with_oracle:
        from components.evaluation.oracle import AnswerCache, OracleEmbedder

        greedy_settings = (generation or GenerationSpec()).model_copy(update={"do_sample": False, "sampling": "spec"})
        cache = AnswerCache(oracle_dir or evaluation.oracle_dir or "runs/oracle", model.config.backbone, greedy_settings)
        embedders["oracle"] = OracleEmbedder(cache, loaded_teacher, oracle_prompts)
        descriptions["oracle"] = (
            f"the response oracle: the teacher ({teacher.kind} {where if teacher.kind != 'backbone_mean_pool' else ''}"
            f") on the backbone's greedy answer (at most {greedy_settings.max_new_tokens} new tokens) to each text, "
            "asked with the model's prompts; the ceiling of distilling that teacher"
        )
    log.info("loaded %d model(s) in %.1fs", len(embedders), time.perf_counter() - started)

    info = {
        "model": str(model_ref),
        "model_folder": str(folder),
        "tasks": task_names,
        "suite": ",".join(evaluation.tasks) if evaluation.tasks else evaluation.suite,
        "limit": evaluation.limit,
        "size": evaluation.size_label,
        "data_dir": evaluation.data_dir,
        "prompts": prompts or "the model folder's",
        "evaluation": evaluation.model_dump(mode="json"),
    }
    # The report is (re)written after each model: a run stopped part-way keeps the models it finished.
    paths: dict[str, Path] = {}
    results, seconds = evaluate_embedders(
        embedders, task_names, evaluation,
        after_each=lambda done, took: paths.update(write_report(done, took, info, output, descriptions)),
    )
    if "oracle" in embedders:
        info["oracle_answers_generated"] = embedders["oracle"].cache.generated  # 0 when every answer was cached
        paths.update(write_report(results, seconds, info, output, descriptions))
    if tracking_uri:
        run_id = log_to_mlflow(results, paths, tracking_uri, run_id, run_name=f"evaluate {folder.name}")
        log.info("scores logged to MLflow run %s at %s", run_id, tracking_uri)
    return {**report_dict(results, seconds, info), "paths": {kind: str(path) for kind, path in paths.items()},
            "mlflow_run_id": run_id}


def prompt_set_names(prompts: str | None) -> list[str | None]:
    """--prompts "bare,generative" -> ["bare", "generative"]; none given -> [None] (the folder's own)."""
    names = [name.strip() for name in (prompts or "").split(",") if name.strip()]
    return list(dict.fromkeys(names)) or [None]


def load_prompts(name_or_file: str) -> dict[str, str]:
    """A named prompt set, or a JSON file holding a mapping of prompt keys to instructions."""
    from components.prompts import PROMPT_SETS, prompt_set

    if name_or_file in PROMPT_SETS:
        return prompt_set(name_or_file)
    path = Path(name_or_file)
    if not path.is_file():
        raise ValueError(f"--prompts {name_or_file!r}: neither a prompt set ({', '.join(PROMPT_SETS)}) nor a JSON file")
    mapping = json.loads(path.read_text())
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ValueError(f"--prompts {path}: expected a JSON object of strings (prompt key -> instruction)")
    return mapping


def _describe_prompts(prompts: dict[str, str]) -> str:
    return str(sorted(prompts)) if len(prompts) <= 6 else f"{len(prompts)} keys"


def stage_evaluate(spec: Spec, results: dict[str, Any]) -> dict[str, Any]:
    """The evaluate stage of workflows.run: the trained model on spec.evaluation, scores into the training's MLflow run."""
    train = results.get("train") or {}
    if not train.get("model_dir"):
        raise ValueError("the evaluate stage needs the train stage's model_dir (run it with --stages train,evaluate)")
    evaluation, choice = resolve_auto(spec.evaluation)
    if choice is not None:
        print(choice.line, flush=True)
    if not suite_tasks(evaluation):
        if choice is not None:  # suite auto with nothing to run here: the job goes on, the summary says why
            return {"evaluation": choice.line}
        log.info("evaluation.suite is 'none' and evaluation.tasks is empty: nothing to evaluate")
        return {}
    ran = choice.line if choice is not None else f"suite {','.join(evaluation.tasks) or evaluation.suite}"
    # One report per (trained model, evaluation settings): a rerun of the same spec reuses it.
    sections = ("evaluation", "teacher", "generation") if spec.evaluation.with_oracle else ("evaluation", "teacher")
    fingerprint = spec.fingerprint(*sections) + (f"-{choice.kind}" if choice is not None else "")
    output = spec.run_dir / "evaluation" / f"{Path(train['model_dir']).parent.name}-{fingerprint}"
    markdown = output / "results.md"
    if (output / "results.json").is_file() and markdown.is_file():
        log.info("evaluate: %s exists, skipping", output)
        done = json.loads((output / "results.json").read_text())
        return {"report": str(markdown), "averages": done["averages"], "evaluation": ran, "placement": done.get("placement")}
    tracking = spec.tracking.enabled and train.get("mlflow_tracking_uri")
    from components.evaluation.remote import evaluate_on_worker

    # On the evaluation actor (the spec's evaluation resources: a GPU worker on a cluster), not in the driver.
    report = evaluate_on_worker(
        spec,
        train["model_dir"],
        output,
        evaluation=evaluation,
        teacher=spec.teacher,
        tracking_uri=train.get("mlflow_tracking_uri") if tracking else None,
        run_id=train.get("mlflow_run_id") if tracking else None,
        generation=spec.generation,
        oracle_dir=spec.evaluation.oracle_dir or spec.run_dir / "oracle",
    )
    return {"report": str(report["paths"]["markdown"]), "averages": report["averages"], "evaluation": ran,
            "placement": report["placement"]}


# ----------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workflows.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("model", help="a model folder or models:/<name>/<version>")
    parser.add_argument("--suite", help=f"{' | '.join(SUITES)} | auto | comma-separated task names (default: the spec's, else local)")
    parser.add_argument("--baselines", action="store_true", default=None, help="also the teacher, mean pooling, last token, PromptEOL (plain and chat) and Echo")
    parser.add_argument("--training-free", help="with --baselines: which training-free baselines, comma-separated, from "
                                                "mean-pool,last-token,prompteol,prompteol-chat,echo (default: the spec's, else all)")
    parser.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=None,
                        help="the response oracle: the teacher on the backbone's greedy answers (default: with --baselines)")
    parser.add_argument("--limit", type=int, help="the quick mode: about N evaluation items per task (pairs, test rows, "
                                                  "queries or candidate pairs); without it every task runs at full size")
    parser.add_argument("--output", type=Path, help="report folder (default runs/evaluation/<the model reference as a name>)")
    parser.add_argument("--spec", help="a spec whose evaluation section (and teacher) are the defaults")
    parser.add_argument("--teacher", help="the teacher for --baselines: backbone_mean_pool, sentence_transformers:<location>, "
                                          "hf_mean_pool:<location> (default: the spec's, else the one saved with the model)")
    parser.add_argument("--data-dir", help="where the local datasets are (default ../shared/data)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--distractors-per-query", type=int, help="under --limit, random other documents kept per retrieval query")
    parser.add_argument("--hard-negatives-per-query", type=int,
                        help="under --limit, a retrieval query's closest documents by TF-IDF kept in the corpus")
    parser.add_argument("--oracle-dir", help="where the oracle's answers are cached (default: the spec's, else runs/oracle)")
    parser.add_argument("--prompts", help="the model's instructions for this evaluation instead of its folder's: "
                                          "bare | generative (components/prompts.py) | a JSON file of prompt key -> text; "
                                          "comma-separated: one column each (e.g. bare,generative)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="log scores to MLflow here")
    parser.add_argument("--run-id", help="the MLflow run to log into (default: a new run)")
    return parser.parse_args(argv)


def evaluation_from_args(args: argparse.Namespace, spec: Spec | None) -> EvaluationSpec:
    """The spec's evaluation section (or the defaults), with the command line's options on top."""
    evaluation = spec.evaluation if spec else EvaluationSpec()
    updates: dict[str, Any] = {"limit": args.limit, "data_dir": args.data_dir, "batch_size": args.batch_size,
                               "baselines": args.baselines, "distractors_per_query": args.distractors_per_query,
                               "hard_negatives_per_query": args.hard_negatives_per_query, "oracle": args.oracle,
                               "oracle_dir": args.oracle_dir}
    if args.training_free:
        updates["training_free"] = [name.strip() for name in args.training_free.split(",") if name.strip()]
    if args.suite:
        named = args.suite in SUITES or args.suite == "auto"
        updates.update({"suite": args.suite, "tasks": []} if named else {"tasks": expand_suite(args.suite)})
    return EvaluationSpec.model_validate({**evaluation.model_dump(), **{k: v for k, v in updates.items() if v is not None}})


def default_report_name(model_ref: str) -> str:
    """runs/smollm2/train/model -> runs_smollm2_train_model; models:/name/3 -> models_name_3 (model folders are
    often all called `model`, so the whole reference names the report)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", model_ref).strip("_.") or "model"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = load_spec(args.spec) if args.spec else None
        evaluation = evaluation_from_args(args, spec)
    except (SpecError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.prompts is not None:
        try:
            [load_prompts(name) for name in prompt_set_names(args.prompts) if name is not None]
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    evaluation, choice = resolve_auto(evaluation)
    if choice is not None:
        if choice.skipped:
            print(f"error: {choice.line}", file=sys.stderr)
            return 2
        print(choice.line)
    if not suite_tasks(evaluation):
        print("error: no tasks to run (suite 'none' and no evaluation.tasks)", file=sys.stderr)
        return 2
    problem = preflight(evaluation)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if is_offline(suite_tasks(evaluation)):
        go_offline()  # before transformers, datasets and mteb are imported
    # sklearn warns on each of mteb's classifier experiments: small (--limit) test splits leave classes never
    # predicted, and mteb's protocol fixes LogisticRegression(max_iter=100). The scores stand as mteb defines them.
    warnings.filterwarnings("ignore", message=".*ill-defined and being set to 0.0.*")
    warnings.filterwarnings("ignore", message=".*lbfgs failed to converge.*")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("mteb", "datasets", "sentence_transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import datasets

    datasets.disable_progress_bars()
    from components.evaluation.encoders import teacher_from_config

    teacher = teacher_from_config(args.teacher) if args.teacher else (spec.teacher if spec else None)
    output = args.output or Path("runs/evaluation") / default_report_name(str(args.model))
    started = time.perf_counter()
    report = run_evaluation(args.model, evaluation, output, teacher=teacher, tracking_uri=args.tracking_uri, run_id=args.run_id,
                            generation=spec.generation if spec else None, prompts=args.prompts)
    print(Path(report["paths"]["markdown"]).read_text())
    print(f"report: {output} ({time.perf_counter() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
