"""The generate and teach stages: the frozen LLM answers every query, then the teacher embeds every answer.

    python -m workflows.generate SPEC [--set key=value ...] [--teach]

    generate   queries (spec.data) -> Ray Data: ResponseGenerator actors -> <run_dir>/generate/<key>/shard-*.parquet
               rows: id, query, response, prompt_tokens, response_tokens, finish_reason
    teach      those rows -> Ray Data: TeacherEmbedder actors -> <run_dir>/teach/<key>/shard-*.parquet
               the same rows plus `teacher` (list<float32>, the alignment target)

Each output folder is named by a hash of everything that determines it and is complete once it holds
_SUCCESS.json (with the counts); a second run with the same inputs does no work, and a run that died part-way
finishes only the missing shards (components/stages.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from components.generation import (
    Generated,
    ResponseGenerator,
    backbone_identity,
    check_backend,
    load_tokenizer,
    render_prompt,
    responses_table,
    tokenize_prompts,
)
from components.queries import QuerySelection, load_queries
from components.spec import GenerationSpec, Spec
from components.stages import ActorPool, ShardedOutput, run_sharded
from components.storage import read_parquet
from components.teacher import TeacherEmbedder, teacher_fingerprint
from workflows._cli import add_spec_arguments, spec_from_args

log = logging.getLogger("workflows.generate")

# Bump when the code changes what a stage writes for the same inputs, so that old outputs are not reused.
GENERATE_FORMAT = 2  # 2: decoding through the GGUF blocks (components/block_linear.py) rounds differently
TEACH_FORMAT = 1


def plan_generate(spec: Spec, create: bool = True) -> tuple[ShardedOutput, QuerySelection]:
    """Where the responses for `spec` are (or will be), and the queries they answer; generates nothing."""
    check_backend(spec.generation)
    selection = load_queries(spec.data)
    identity = backbone_identity(spec.backbone)
    generation = spec.generation
    inputs = {
        "stage": "generate",
        "format": GENERATE_FORMAT,
        "backbone": spec.backbone.model_dump(mode="json"),
        "backbone_fingerprint": identity.fingerprint,
        "chat_template_sha256": hashlib.sha256(identity.chat_template.encode()).hexdigest(),
        "decoding": generation.model_dump(
            mode="json",
            include={"backend", "max_new_tokens", "do_sample", "temperature", "top_p", "stop", "system_prompt",
                     "enable_thinking"},
        ),
        "sampling_seed": spec.data.seed if generation.do_sample or generation.sampling == "model_default" else None,
        "queries_sha256": selection.digest(),
    }
    # The decoding keys added since format 2 count only when set, so that greedy runs keep their folder; sampled rows
    # draw from per-row streams (components/generation.py row_seeds), which changed what a seed gives.
    added = {key: value for key, value in generation.model_dump(
        mode="json", include={"sampling", "top_k", "min_p", "repetition_penalty"}).items()
        if value != GenerationSpec.model_fields[key].default}
    if added:
        inputs["decoding_added"] = added
    if inputs["sampling_seed"] is not None:
        inputs["seeding"] = "per-row"
    if selection.responses is not None:  # answers given by the data (response_field): nothing is decoded
        inputs["given_responses"] = True
    output = ShardedOutput.open(spec.run_dir / "generate", inputs, len(selection.texts), generation.shard_size, create)
    return output, selection


def run_generate(spec: Spec) -> Path:
    """The folder of responses to the spec's queries, generated now unless an earlier run did."""
    output, selection = plan_generate(spec)
    if output.complete:
        log.info("generate: cached at %s", output.folder)
        return output.folder
    log.info("generate: %s", selection.describe())
    started = time.perf_counter()
    table = selection.table()
    if selection.responses is not None:
        written = pass_given_responses(output, table, spec)
    else:
        written = run_sharded(
            output,
            lambda shard: table.slice(shard * output.shard_size, output.shard_size),
            ResponseGenerator,
            (spec.backbone, spec.generation, spec.data.seed),
            ActorPool.of(spec.generation),
        )
    manifest = output.finish(
        {"stage": "generate", **response_counts(output), "data": selection.report_dict(),
         "shards_written_by_last_run": len(written), "seconds_last_run": round(time.perf_counter() - started, 1)}
    )
    log.info("generate: done at %s: %d rows, finish reasons %s", output.folder, manifest["rows"],
             json.dumps(manifest["finish_reasons"]))
    return output.folder


def pass_given_responses(output: ShardedOutput, table, spec: Spec) -> list[int]:
    """The data's own answers (data.sources[].response_field) written as the generate stage's shards, in-process:
    no model runs. Token counts are the backbone tokenizer's, as for generated answers; finish_reason is "given"."""
    tokenizer = load_tokenizer(spec.backbone)
    pending = output.missing_shards()
    for shard in pending:
        rows = table.slice(shard * output.shard_size, output.shard_size)
        queries, responses = rows.column("query").to_pylist(), rows.column("response").to_pylist()
        prompts = tokenize_prompts(tokenizer, [render_prompt(tokenizer, query, spec.generation) for query in queries])
        answers = tokenizer(responses, add_special_tokens=False)["input_ids"]
        results = [Generated(response, len(prompt), len(answer), "given")
                   for response, prompt, answer in zip(responses, prompts, answers, strict=True)]
        output.write_shard(shard, responses_table(rows.column("id").to_pylist(), queries, results))
    return pending


def run_teach(spec: Spec, responses: Path | None = None) -> Path:
    """The folder of responses with their teacher vectors; generates the responses first if needed."""
    source = ShardedOutput.load(responses or run_generate(spec))
    teacher = spec.teacher
    inputs = {
        "stage": "teach",
        "format": TEACH_FORMAT,
        "responses": source.key,
        "teacher": teacher.model_dump(mode="json", include={"kind", "name", "package", "path_in_package", "normalize",
                                                            "max_tokens"}),
        "teacher_fingerprint": teacher_fingerprint(teacher, spec.backbone),
    }
    if teacher.kind == "llm2vec":  # pooling over every attended token and an unmerged last adapter since format 1
        inputs["llm2vec"] = {"pooling": teacher.pooling, "merge_adapters": teacher.merge_adapters}
    output = ShardedOutput.open(spec.run_dir / "teach", inputs, source.num_rows, source.shard_size)
    if output.complete:
        log.info("teach: cached at %s", output.folder)
        return output.folder
    started = time.perf_counter()
    written = run_sharded(
        output,
        lambda shard: read_parquet(source.shard_path(shard)),
        TeacherEmbedder,
        (teacher, spec.backbone),
        ActorPool.of(teacher),
    )
    output.finish({"stage": "teach", "responses": str(source.folder), "dimension": vector_dimension(output),
                   "shards_written_by_last_run": len(written),
                   "seconds_last_run": round(time.perf_counter() - started, 1)})
    log.info("teach: done at %s", output.folder)
    return output.folder


def response_counts(output: ShardedOutput) -> dict[str, Any]:
    table = output.read(columns=["response", "prompt_tokens", "response_tokens", "finish_reason"])
    return {
        "finish_reasons": dict(Counter(table.column("finish_reason").to_pylist())),
        "prompt_tokens": pc.sum(table.column("prompt_tokens")).as_py(),
        "response_tokens": pc.sum(table.column("response_tokens")).as_py(),
        "empty_responses": pc.sum(pc.equal(pc.utf8_length(table.column("response")), 0)).as_py(),
    }


def vector_dimension(output: ShardedOutput) -> int:
    lengths = pc.unique(pc.list_value_length(output.read(columns=["teacher"]).column("teacher"))).to_pylist()
    if len(lengths) != 1:
        raise ValueError(f"{output.folder}: teacher vectors of different lengths {sorted(lengths)}")
    return lengths[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.generate", description=__doc__.split("\n\n")[0])
    add_spec_arguments(parser)
    parser.add_argument("--teach", action="store_true", help="also embed the responses with the teacher")
    args = parser.parse_args(argv)
    spec = spec_from_args(args)
    if spec is None:
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    folder = run_teach(spec) if args.teach else run_generate(spec)
    print(folder)
    print((folder / "_SUCCESS.json").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
