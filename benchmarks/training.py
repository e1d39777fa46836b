"""Training samples per second: our step against the official llm2vec-gen implementation, on real lengths.

    python -m benchmarks.training [--samples 48] [--responses FILE.jsonl] [--threads 2] [--lengths 16,32,64] [--keep]

Both train the same backbone (specs/smollm2-135m.yaml: SmolLM2-135M-Instruct, fp32, T + C special tokens),
on the same rows, micro batch `training.micro_batch_size` (8), AdamW at `training.lr` with gradient clipping,
2 torch threads each (--threads), on this CPU, in one run:
    ours      LLM2VecGen.forward (cached query prefix, right-padded responses, logits of real tokens only) on
              our length-grouped micro batches (components.training.micro_batches, the order the training loop
              uses), collation included; a plain torch AdamW step (the loop wraps the same in DeepSpeed ZeRO-0)
    official  the `llm2vec-gen==0.1.3` package (installed by this script into its own venv under the cache
              folder: transformers 4.56.2, peft 0.18.0, torch 2.13.0 CPU, --no-deps since its flash-attn and
              torch 2.6 pins do not install here): its EncoderDecoderModel with a frozen decoder copy,
              TrainableTokens and the two ProjectionModels, as its scripts/train.py builds them, on random
              batches padded to the longest; once with its default gradient checkpointing and once without
              (see benchmarks/_official_step.py)
Rows: `--samples` real queries selected from the spec's data sources as the generate stage selects them, with
the backbone's own greedy answers (max_new_tokens 128, the paper's setting would be longer still), generated once
and cached in <cache>/bench-responses.jsonl (or read from --responses, a jsonl of {"query", "response"});
teacher vectors are random unit vectors (the teacher's size, 384).

Before timing, the equality check (equality_check): ours and the official step compute the reconstruction CE,
the alignment MSE and the gradients of every trained tensor on the same batch from the same weights (ours copied
into theirs), first both in float64 (two more processes: the same code with the backbone, the heads and every op
in float64, see _official_step.py), where they must agree to float64 rounding (FLOAT64_TOLERANCE), then the three
float32 systems, each measured against that float64 result: our float32 rounding must be no larger than the
official code's own (FLOAT32_FACTOR), the losses within 1e-4. A failure stops the benchmark before timing.
--lengths 16,32,64 repeats the check with the answers capped shorter (how the float32 gap grows with length).
Each system runs in its own process (so that peak RSS, ru_maxrss, is comparable), and the
three are interleaved step by step (1 warm-up round, then one round per micro batch, the order rotating), so that
load from other processes on the machine falls on all of them alike. Each step's process CPU time is printed
next to its wall time: on a machine shared with other jobs the wall times swing several-fold, and with
--threads 1 the CPU time is the work done, whatever the load (with 2 threads it also counts spin-waiting).
The last line printed is `training ratio: X.XX` (ours over the official default, samples/s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SPEC = "specs/smollm2-135m.yaml"
# The projections start random, as the official code's do: the default spec's data-dependent starts (fitted
# before training, which this benchmark does not time) begin from identity, where z = h has the hidden states'
# large norms and the two implementations' float rounding differs by more than the gradient check allows.
SPEC_OVERRIDES = ["model.reconstruction_init=random", "model.alignment_init=random"]
EMBEDDING_DIM = 384  # all-MiniLM-L6-v2, the spec's teacher
MAX_NEW_TOKENS = 128
THREADS = 2  # torch threads in every process (--threads)
TOLERANCE = 1e-4  # on the two float32 losses
# The equality check (equality_check; figures in docs/benchmarks.md). In float64 the two steps agree to 4e-16 on the
# losses and 3e-12 on the gradients (30 layers, 576 x 49152 logits, sums over ~1e6 terms at float64's 1.1e-16):
# the same computation, 30x margin. In float32 each side's own rounding, measured against that float64 result, is
# 6e-4 (ours) and 1.6e-3 (official) on the special rows' gradient, the same at 16 and at 128 answer tokens: a fixed
# tolerance on the ours-vs-official gap (1e-3 until issue 27) sat on top of rounding and failed by chance. The
# float32 criterion is now relative to the official code's own rounding, per trained tensor.
FLOAT64_TOLERANCE = 1e-10
FLOAT32_FACTOR = 2.0  # ours may round at most twice as far from the float64 result as the official code does
FLOAT32_FLOOR = 1e-6  # ~10 float32 epsilons: the alignment head's gradients round at 4e-7 on both sides
OFFICIAL_PINS = ["torch==2.13.0", "transformers==4.56.2", "peft==0.18.0", "accelerate==1.15.0", "safetensors", "numpy"]
OFFICIAL_PACKAGE = "llm2vec-gen==0.1.3"
TRAINED = ["special_embeddings", "reconstruction.weight", "reconstruction.bias", "alignment.weight", "alignment.bias"]


# ------------------------------------------------------------------------------------------- the official venv


def official_python(cache_dir: Path) -> Path:
    """<cache>/official-venv/bin/python with llm2vec-gen 0.1.3 and its working pins; created on first use."""
    venv = cache_dir / "official-venv"
    python = venv / "bin" / "python"
    probe = "import llm2vec_gen.models, transformers, peft; assert transformers.__version__ == '4.56.2', transformers.__version__"
    if python.exists() and subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0:
        return python
    print(f"installing {OFFICIAL_PACKAGE} into {venv} (once) ...", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    # torch pinned in the same command, so that nothing pulls an unpinned (CUDA) build.
    subprocess.run([*pip, *OFFICIAL_PINS], check=True)
    subprocess.run([*pip, "--no-deps", OFFICIAL_PACKAGE], check=True)
    subprocess.run([str(python), "-c", probe], check=True)
    return python


def transformers4_folder(folder: Path, target: Path) -> Path:
    """A copy of our cached backbone folder that transformers 4.56 reads correctly (the cache is not touched).

    transformers 5 writes rope_parameters (4.56 would silently fall back to rope_theta 10000), a tokenizer
    class 4.56 does not know and its extra special tokens as a list; the weights are linked, not copied.
    """
    target.mkdir(parents=True)
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope {rope} is not translated for transformers 4.56")
    config["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    config["rope_scaling"] = None
    config["torch_dtype"] = config.get("dtype", "float32")
    (target / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = tokenizer_config.pop("extra_special_tokens", None)  # transformers 5's list; 4.56 reads a dict there
    if isinstance(extra, list):
        tokenizer_config["additional_special_tokens"] = extra
    elif extra:
        tokenizer_config["extra_special_tokens"] = extra
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    for name in ("tokenizer.json", "generation_config.json", "model.safetensors"):
        if (folder / name).exists():
            (target / name).symlink_to(folder / name)
    return target


# --------------------------------------------------------------------------------------------------- the rows


def load_rows(spec, samples: int, responses_file: Path | None, cache_dir: Path, fingerprint: str) -> tuple[list[dict], str]:
    """(query, response) rows and a sentence saying where the responses came from."""
    if responses_file:
        rows = [json.loads(line) for line in responses_file.read_text().splitlines() if line.strip()][:samples]
        if len(rows) < samples:
            raise SystemExit(f"{responses_file}: {len(rows)} rows, --samples {samples}")
        return [{"query": r["query"], "response": r["response"]} for r in rows], f"responses read from {responses_file}"

    from components.queries import load_queries

    queries = load_queries(spec.data.model_copy(update={"limit": samples})).texts
    cache = cache_dir / "bench-responses.jsonl"
    known = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            row = json.loads(line)
            if row.get("backbone") == fingerprint and row.get("max_new_tokens") == MAX_NEW_TOKENS:
                known[row["query"]] = row["response"]
    missing = [q for q in queries if q not in known]
    if missing:
        from components.backbone import load_backbone
        from components.generation import generate_responses

        print(f"generating the backbone's answers to {len(missing)} queries (greedy, max_new_tokens "
              f"{MAX_NEW_TOKENS}; cached in {cache}) ...", flush=True)
        started = time.perf_counter()
        backbone = load_backbone(spec.backbone)
        generation = spec.generation.model_copy(update={"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False})
        results = generate_responses(backbone.model, backbone.tokenizer, missing, generation)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with cache.open("a") as handle:
            for query, result in zip(missing, results, strict=True):
                known[query] = result.response
                handle.write(json.dumps({"query": query, "response": result.response, "backbone": fingerprint,
                                         "max_new_tokens": MAX_NEW_TOKENS}) + "\n")
        del backbone
        print(f"  done in {time.perf_counter() - started:.0f}s", flush=True)
    where = (f"the backbone's own greedy answers (components.generation, max_new_tokens {MAX_NEW_TOKENS}; the spec's "
             f"CPU-sized default is {spec.generation.max_new_tokens}), {'generated now' if missing else 'read'} from {cache}")
    rows = [{"query": q, "response": known[q]} for q in queries]
    return [r for r in rows if r["response"].strip()], where


# ------------------------------------------------------------------------------------------------- processes


class Worker:
    """A benchmark process spoken to with one JSON line each way."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]):
        self.name, self.log_path = name, log
        self.log = log.open("w")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)

    def send(self, **command) -> None:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = "\n".join(self.log_path.read_text().splitlines()[-30:])
            raise RuntimeError(f"the {self.name} worker exited ({self.proc.returncode}); end of {self.log_path}:\n{tail}")
        message = json.loads(line)
        if "error" in message:
            raise RuntimeError(f"the {self.name} worker failed:\n{message['error']}")
        return message

    def call(self, **command) -> dict:
        self.send(**command)
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def ours_worker(workdir: Path, dtype: str = "float32") -> None:
    """`python -m benchmarks.training --worker ours|ours-float64 WORKDIR`: our model, the protocol of _official_step.py.

    The float32 worker writes the starting weights (init.safetensors) and the token ids; the float64 one, started
    after it, reads those weights and runs only checks (see float64_model).
    """
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    try:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        from safetensors.torch import load_file, save_file

        from components.model import LLM2VecGen
        from components.spec import load_spec

        spec = load_spec(SPEC, SPEC_OVERRIDES)
        training = spec.training
        rows = json.loads((workdir / "rows.json").read_text())
        teacher = load_file(workdir / "teacher.safetensors")["teacher"]
        model = LLM2VecGen.from_spec(spec, embedding_dim=EMBEDDING_DIM)
        if dtype == "float64":
            float64_model(model, load_file(workdir / "init.safetensors"))
        else:
            # Token ids exactly as our collate makes them, for the official side; and our starting weights.
            tokenized = []
            for index, row in enumerate(rows):
                one = model.collate([row["query"]], [row["response"]], teacher[index : index + 1], MAX_NEW_TOKENS)
                tokenized.append({"query_ids": one.query_ids[0][one.query_mask[0].bool()].tolist(),
                                  "response_ids": one.response_ids[0][one.response_mask[0].bool()].tolist()})
            save_file({name: value.detach().contiguous() for name, value in model.state_dict().items()},
                      workdir / "init.safetensors")
        model.train()
        params = model.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)
        if dtype == "float64":
            reply({"ready": True})
        else:
            reply({
                "ready": True,
                "tokenized": tokenized,
                "special_tokens": model.config.special_tokens,
                "special_ids": model.tokenizer.convert_tokens_to_ids(model.config.special_tokens),
                "pad_id": model.tokenizer.pad_token_id,
                "compression_tokens": model.config.compression_tokens,
                "trainable": sum(p.numel() for p in params),
                "lr": training.lr, "weight_decay": training.weight_decay, "grad_clip": training.grad_clip,
                "weights": list((spec.loss.reconstruction, spec.loss.alignment)),  # the official side takes the pair
                "micro_batch_size": training.micro_batch_size, "seed": training.seed,
                "cache_query_prefix": model.cache_query_prefix,
            })
    except Exception:
        reply({"error": traceback.format_exc()})
        return

    def losses(indices, cap=MAX_NEW_TOKENS):
        chosen = [rows[i] for i in indices]
        batch = model.collate([r["query"] for r in chosen], [r["response"] for r in chosen], teacher[indices], cap)
        return model(batch, spec.loss)

    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command["cmd"] == "check":
                result = losses(command["rows"], command.get("cap", MAX_NEW_TOKENS))
                result.total.backward()
                save_file({name: p.grad.detach().clone() for name, p in model.named_parameters()}, command["grads_file"])
                optimizer.zero_grad(set_to_none=True)
                reply({"reconstruction": result.reconstruction.item(), "alignment": result.alignment.item()})
            elif command["cmd"] == "step":
                started, cpu = time.perf_counter(), time.process_time()
                result = losses(command["rows"])
                result.total.backward()
                torch.nn.utils.clip_grad_norm_(params, training.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                reply({"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu})
            elif command["cmd"] == "finish":
                reply({"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
                return
            else:
                reply({"error": f"unknown command {command['cmd']!r}"})
        except Exception:
            reply({"error": traceback.format_exc()})


def float64_model(model, start: dict[str, torch.Tensor]):
    """`model` (an LLM2VecGen) with the weights `start`, in float64 throughout, for the equality check.

    The backbone goes to float64 with it, and the float32 casts transformers hard-codes (RMSNorm, rotary
    embedding) are taken out by the same function that the official worker applies to its model.
    """
    from benchmarks._official_step import exact_float64

    model.load_state_dict(start)
    model.double()  # the backbone too: LLM2VecGen._apply moves it along
    exact_float64(model.backbone)
    return model


# ------------------------------------------------------------------------------------------------------- main


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def tensor_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def worker_check(worker: Worker, rows: list[int], cap: int, grads_file: Path) -> tuple[dict, dict]:
    """(losses, gradients of the trained tensors in float64) of one forward + backward, no update."""
    from safetensors.torch import load_file

    losses = worker.call(cmd="check", rows=rows, grads_file=str(grads_file), cap=cap)
    return losses, {key: value.double() for key, value in load_file(grads_file).items() if key in TRAINED}


def equality_check(float64_workers: dict[str, Worker], float32_workers: dict[str, Worker], rows: list[int], cap: int,
                   workdir: Path, answer_lengths: list[int]) -> str:
    """Both steps on one batch and the same weights, first in float64, then in float32; prints the figures and
    returns what failed ("" when nothing did).

    float64: ours and the official code must agree to FLOAT64_TOLERANCE (losses and every gradient): the same
    computation up to float64 rounding, so any float32 difference left is rounding.
    float32: each side's own rounding is measured against the float64 result (the truth for both): ours must be
    no less exact than the official code's (FLOAT32_FACTOR, per trained tensor, plus FLOAT32_FLOOR for tensors
    whose errors are at float32 epsilon), and the losses must agree to TOLERANCE. The ours-vs-official float32
    gap is printed; it cannot exceed the sum of the two errors, so it needs no tolerance of its own.
    """
    results = {}
    for name, worker in {**float64_workers, **float32_workers}.items():
        results[name] = worker_check(worker, rows, cap, workdir / f"grads-{name}.safetensors")
    (ours64, ours64_grads), (theirs64, theirs64_grads) = results["ours-float64"], results["official-float64"]
    print(f"equality check, answers capped at {cap} tokens (this batch's answer tokens: {sorted(answer_lengths)}):")
    loss64 = max(relative(ours64[k], theirs64[k]) for k in ("reconstruction", "alignment"))
    grad64 = {key: tensor_relative(ours64_grads[key], theirs64_grads[key]) for key in TRAINED}
    print(f"  float64 ours vs official: losses {ours64['reconstruction']:.15f} / {ours64['alignment']:.15f}, rel. diff "
          f"{loss64:.1e}; gradients rel. diff " + ", ".join(f"{key} {value:.1e}" for key, value in grad64.items()))
    errors = {name: {key: tensor_relative(results[name][1][key], theirs64_grads[key]) for key in TRAINED}
              for name in float32_workers}
    for name in float32_workers:
        print(f"  float32 {name:16s} vs float64: losses rel. "
              + " / ".join(f"{relative(results[name][0][k], theirs64[k]):.1e}" for k in ("reconstruction", "alignment"))
              + "; gradients rel. " + ", ".join(f"{key} {value:.1e}" for key, value in errors[name].items()))
    officials = [name for name in float32_workers if name != "ours"]
    gap = {key: max(tensor_relative(results["ours"][1][key], results[name][1][key]) for name in officials) for key in TRAINED}
    loss32 = max(relative(results["ours"][0][k], results[name][0][k]) for name in officials for k in ("reconstruction", "alignment"))
    print(f"  float32 ours vs official (worst of {len(officials)}): losses rel. diff {loss32:.1e}; gradients rel. diff "
          + ", ".join(f"{key} {value:.1e}" for key, value in gap.items()))
    failed = []
    if loss64 > FLOAT64_TOLERANCE or max(grad64.values()) > FLOAT64_TOLERANCE:
        failed.append(f"float64 losses differ by {loss64:.1e}, gradients by {max(grad64.values()):.1e} "
                      f"(tolerance {FLOAT64_TOLERANCE:.0e})")
    allowed = {key: FLOAT32_FACTOR * min(errors[name][key] for name in officials) + FLOAT32_FLOOR for key in TRAINED}
    worse = {key: errors["ours"][key] for key in TRAINED if errors["ours"][key] > allowed[key]}
    if worse:
        failed.append("float32 rounding of ours above the official's (x" f"{FLOAT32_FACTOR:g} + {FLOAT32_FLOOR:.0e}): "
                      + ", ".join(f"{key} {value:.1e} > {allowed[key]:.1e}" for key, value in worse.items()))
    if loss32 > TOLERANCE:
        failed.append(f"float32 losses differ by {loss32:.1e} (tolerance {TOLERANCE:.0e})")
    print("  " + ("FAILED: " + "; ".join(failed) if failed else
                  f"OK: equal in float64 (within {FLOAT64_TOLERANCE:.0e}); in float32 ours within x{FLOAT32_FACTOR:g} "
                  f"of the official code's own rounding"), flush=True)
    return "; ".join(failed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=48, help="rows; one timed step per micro batch of them")
    parser.add_argument("--responses", type=Path, default=None, help='jsonl of {"query", "response"} to use instead')
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="torch threads per process; with 1, process CPU time is the work even on a busy machine")
    parser.add_argument("--keep", action="store_true", help="keep the exchange folder (batches, weights, logs)")
    parser.add_argument("--lengths", type=lambda text: [int(x) for x in text.split(",")], default=[],
                        help=f"also run the equality check with answers capped at these token counts (e.g. 16,32,64); "
                             f"the check at {MAX_NEW_TOKENS} always runs and decides")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        ours_worker(Path(args.worker[1]), "float64" if args.worker[0] == "ours-float64" else "float32")
        return

    torch.set_num_threads(args.threads)
    from safetensors.torch import save_file

    from components.backbone import convert_gguf, default_cache_dir, locate_package_file
    from components.spec import load_spec
    from components.training import micro_batches

    spec = load_spec(SPEC, SPEC_OVERRIDES)
    cache_dir = default_cache_dir()
    started, load_at_start = time.perf_counter(), os.getloadavg()
    python = official_python(cache_dir)
    folder = convert_gguf(locate_package_file(spec.backbone.name, spec.backbone.file), cache_dir)
    fingerprint = json.loads((folder / "source.json").read_text())["sha256"]
    rows, where = load_rows(spec, args.samples, args.responses, cache_dir, fingerprint)

    workdir = Path(tempfile.mkdtemp(prefix="llm2vec-gen-bench-training-"))
    workers: list[Worker] = []
    try:
        (workdir / "rows.json").write_text(json.dumps(rows))
        generator = torch.Generator().manual_seed(0)
        teacher = torch.nn.functional.normalize(torch.randn(len(rows), EMBEDDING_DIM, generator=generator), dim=-1)
        save_file({"teacher": teacher}, workdir / "teacher.safetensors")
        env = worker_env(args.threads)

        ours = Worker("ours", [sys.executable, "-m", "benchmarks.training", "--worker", "ours", str(workdir)],
                      workdir / "ours.log", env)
        workers.append(ours)
        info = ours.receive()
        tokenized = info["tokenized"]
        meta = {key: info[key] for key in ("special_tokens", "special_ids", "pad_id", "compression_tokens", "lr",
                                           "weight_decay", "grad_clip", "weights")}
        meta |= {"rows": tokenized, "embedding_dim": EMBEDDING_DIM}
        (workdir / "meta.json").write_text(json.dumps(meta))
        transformers4_folder(folder, workdir / "backbone-transformers4")
        official = {}
        for mode in ("on", "off"):
            name = "official" if mode == "on" else "official-no-ckpt"
            official[name] = Worker(name, [str(python), "-I", str(ROOT / "benchmarks" / "_official_step.py"), str(workdir),
                                           "--checkpointing", mode], workdir / f"{name}.log", env)
            workers.append(official[name])
        described = {name: worker.receive() for name, worker in official.items()}

        # Batches: ours length-grouped as the training loop groups them; theirs random, padded to the longest.
        micro = info["micro_batch_size"]
        lengths = [len(t["query_ids"]) + len(t["response_ids"]) for t in tokenized]  # tokens, as the training loop
        ours_batches = micro_batches(lengths, micro, seed=info["seed"], epoch=0)
        order = list(range(len(rows)))
        random.Random(info["seed"]).shuffle(order)
        random_batches = [order[i : i + micro] for i in range(0, len(order) - micro + 1, micro)]
        schedule = {"ours": ours_batches, "official": random_batches, "official-no-ckpt": random_batches}

        query_lengths = [len(t["query_ids"]) for t in tokenized]
        response_lengths = [len(t["response_ids"]) for t in tokenized]
        special, compression = len(meta["special_ids"]), meta["compression_tokens"]
        print(f"training step benchmark: {SPEC} (SmolLM2-135M-Instruct fp32), {special} special tokens "
              f"({special - compression} thought + {compression} compression), micro batch {micro}, "
              f"torch threads {args.threads} per process, CPU ({os.cpu_count()} cores)")
        print(f"official: {described['official']['versions']}; trainable tensors ours {info['trainable']:,} "
              f"official {described['official']['trainable']:,} values")
        print(f"rows: {len(rows)} real queries from the spec's data sources; responses: {where}")
        print(f"  query tokens min/median/max {min(query_lengths)}/{statistics.median(query_lengths):.0f}/"
              f"{max(query_lengths)}, response tokens (+EOS) min/median/max {min(response_lengths)}/"
              f"{statistics.median(response_lengths):.0f}/{max(response_lengths)}"
              f" ({sum(n >= MAX_NEW_TOKENS for n in response_lengths)} at the {MAX_NEW_TOKENS} cap)")
        for name, batches in (("ours", ours_batches), ("official", random_batches)):
            queries = sum(len(b) * max(query_lengths[i] for i in b) for b in batches)
            answers = sum(len(b) * max(response_lengths[i] for i in b) for b in batches)
            print(f"  {name:8s} batches: {len(batches)} x {micro}, padded positions: queries {queries} "
                  f"(real {sum(query_lengths)}), responses {answers} (real {sum(response_lengths)})")

        # The equality check: the same batch (mixed lengths: the first random batch), the same starting weights.
        check_rows = random_batches[0]
        float64_workers = {
            "ours-float64": Worker("ours-float64", [sys.executable, "-m", "benchmarks.training", "--worker", "ours-float64",
                                                    str(workdir)], workdir / "ours-float64.log", env),
            "official-float64": Worker("official-float64", [str(python), "-I", str(ROOT / "benchmarks" / "_official_step.py"),
                                                            str(workdir), "--checkpointing", "on", "--dtype", "float64"],
                                       workdir / "official-float64.log", env),
        }
        workers += float64_workers.values()
        for worker in float64_workers.values():
            worker.receive()
        float32_workers = {"ours": ours, **official}
        caps = sorted({*args.lengths, MAX_NEW_TOKENS}) if args.lengths else [MAX_NEW_TOKENS]
        for cap in caps:
            verdict = equality_check(float64_workers, float32_workers, check_rows, cap, workdir,
                                     [min(len(tokenized[i]["response_ids"]), cap) for i in check_rows])
            if cap == MAX_NEW_TOKENS:
                failed = verdict
        for worker in float64_workers.values():  # their memory and threads are not wanted while timing
            worker.close()
        if failed:
            raise SystemExit(f"equality check FAILED: {failed}; not timing")

        # Timing: warm-up round, then one round per micro batch; the order rotates every round.
        names = ["ours", "official", "official-no-ckpt"]
        everyone = {"ours": ours, **official}
        steps = min(len(b) for b in schedule.values())
        seconds: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        print(f"timing: 1 warm-up step + {steps} steps of {micro} each, interleaved step by step ...", flush=True)
        for round_ in range(steps + 1):
            batch_index = max(0, round_ - 1)
            for name in names[round_ % 3 :] + names[: round_ % 3]:
                took = everyone[name].call(cmd="step", rows=schedule[name][batch_index])
                if round_ > 0:
                    seconds[name].append(took["seconds"])
                    cpu[name].append(took["cpu_seconds"])
            if round_ > 0:
                print(f"  step {round_}: " + "  ".join(f"{name} {seconds[name][-1]:.2f}s" for name in names), flush=True)
        rss = {name: everyone[name].call(cmd="finish")["max_rss_mib"] for name in names}

        rate = {name: steps * micro / sum(seconds[name]) for name in names}
        labels = {"ours": "ours (length-grouped, cached prefix)", "official": "official, default checkpointing",
                  "official-no-ckpt": "official, checkpointing off"}
        print(f"results ({steps * micro} samples each):")
        for name in names:
            print(f"  {labels[name]:38s} {rate[name]:6.3f} samples/s  ({sum(seconds[name]) / steps:6.2f} s/step, "
                  f"{sum(cpu[name]) / steps:6.2f} CPU s/step)  peak RSS {rss[name]:,.0f} MiB")
        cpu_rate = {name: steps * micro / sum(cpu[name]) for name in names}
        print(f"  by process CPU time instead of wall time (less sensitive to other load): ours/official "
              f"{cpu_rate['ours'] / cpu_rate['official']:.2f}, ours/official without checkpointing "
              f"{cpu_rate['ours'] / cpu_rate['official-no-ckpt']:.2f}")
        print(f"benchmark wall time {time.perf_counter() - started:.0f}s; load average at the start "
              f"{' '.join(f'{x:.1f}' for x in load_at_start)}, now {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
              f"(on {os.cpu_count()} cores)")
        print(f"training ratio vs official with checkpointing off: {rate['ours'] / rate['official-no-ckpt']:.2f}")
        print(f"training ratio: {rate['ours'] / rate['official']:.2f}")
    finally:
        for worker in workers:
            worker.close()
        if args.keep:
            print(f"(exchange folder kept: {workdir})", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
