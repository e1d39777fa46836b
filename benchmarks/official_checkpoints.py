"""Makes the official-format test fixtures with the real official package, and measures how equal the two sides are.

    python -m benchmarks.official_checkpoints [--out tests/fixtures/official] [--cache-dir ~/.cache/llm2vec-gen-ray]

For each of a Qwen3 and a Llama architecture (tiny random backbones, hidden 64, 2 layers, a byte-level tokenizer):
  1. <arch>/backbone        the backbone, saved as a Hugging Face folder that transformers 4.56 reads
  2. <arch>/official        an LLM2Vec-Gen model built, trained 6 AdamW steps and saved by llm2vec-gen 0.1.3 itself
                            (benchmarks/_official_checkpoint_side.py build, in the package's own venv)
  3. <arch>/official_outputs.{safetensors,json}   the package's `encode` of 64 texts of mixed lengths one at a time
                            and in batches of 16, and its greedy decodings (token ids) of each text
  4. <arch>/ours            one of our models on the same backbone (seeded start, heads perturbed), LLM2VecGen.save
  5. <arch>/export          (4) written in the official layout by components/official_format.save_official
  6. <arch>/export_outputs.{safetensors,json}     the official package's outputs on (5)
tests/test_official_format.py compares our loader and our model against (3) and (6), so CI needs no second venv.
Prints the equality figures (docs/results.md). Needs the official venv (benchmarks.training.official_python).

    python -m benchmarks.official_checkpoints --smollm2 runs/official-smollm2 [--texts 16]

does the same both ways on the real SmolLM2-135M-Instruct of specs/smollm2-135m.yaml (its GGUF dequantised to a
Hugging Face folder, copied in the form transformers 4.56 reads for the official side), into a folder that is not
committed (the official adapter saves SmolLM2's whole embedding matrix: 113 MB): the official package builds, trains
and saves a model on it, which we load; and ours, exported, is loaded by the official package. Figures only.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ARCHITECTURES = ("qwen3", "llama")
SPECIAL_TOKENS = ["<think_0>", "<think_1>", "<compress_0>", "<compress_1>", "<compress_2>"]  # T = 2, C = 3
COMPRESSION = 3
EMBEDDING_DIM = 32
MAX_NEW_TOKENS = 12
SIDE = Path(__file__).with_name("_official_checkpoint_side.py")

WORDS = (
    "the a of and to in is was for on with as by at from that this it which be are an or his her their not have "
    "polar bears live sea ice arctic hunt seals disk cleanup frees space windows tool temporary files cached "
    "river bank money loan interest rate climate change warming ocean forest rain city population history war "
    "king queen empire music song album film director actor novel author poem science physics energy atom "
    "protein cell gene virus vaccine doctor patient school student teacher exam football team goal season"
).split()


def mixed_texts(count: int, seed: int = 0) -> list[str]:
    """`count` sentences of 1 to 70 words (a few to ~450 bytes: under 512 tokens with the special tokens)."""
    rng = random.Random(seed)
    lengths = [1, 2, 3, 70, 69, 40] + [rng.randint(1, 70) for _ in range(count - 6)]
    texts = []
    for length in lengths:
        words = [rng.choice(WORDS) for _ in range(length)]
        texts.append((" ".join(words)).capitalize() + rng.choice([".", "?", "!", ""]))
    return texts


def save_backbone(architecture: str, target: Path) -> None:
    """A tiny random backbone as a Hugging Face folder both transformers 5 (ours) and 4.56 (official) read."""
    from benchmarks.training import transformers4_folder
    from components.backbone import build_random_backbone
    from components.spec import RandomBackboneSpec

    spec = RandomBackboneSpec(architecture=architecture, initializer_range=0.2, seed=1 if architecture == "qwen3" else 2)
    model, tokenizer = build_random_backbone(spec)
    staging = target.with_name(target.name + ".t5")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    transformers4_folder(staging, target)
    for link in target.iterdir():  # transformers4_folder links the weights; a fixture holds real files
        if link.is_symlink():
            real = link.resolve()
            link.unlink()
            shutil.copy(real, link)
    shutil.rmtree(staging)
    # transformers 5 writes the extra special tokens as a list under "extra_special_tokens"; 4.56 reads that key as
    # a dict of named tokens and fails, and knows the list as "additional_special_tokens".
    tokenizer_config = json.loads((target / "tokenizer_config.json").read_text())
    tokenizer_config["additional_special_tokens"] = tokenizer_config.pop("extra_special_tokens", [])
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def run_official(python: Path, command: str, work: dict, work_file: Path) -> None:
    work_file.write_text(json.dumps(work))
    done = subprocess.run([str(python), "-I", str(SIDE), command, str(work_file)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"official {command} failed:\n{done.stderr[-4000:]}")


def our_model(backbone_dir: Path, seed: int):
    """One of our models on the fixture backbone: seeded special rows, heads moved off their initial values."""
    from components.backbone import folder_fingerprint, load_backbone
    from components.model import LLM2VecGen, ModelConfig
    from components.spec import BackboneSpec

    spec = BackboneSpec(source="folder", name=str(backbone_dir))
    backbone = load_backbone(spec)
    config = ModelConfig(
        backbone=spec, backbone_fingerprint=folder_fingerprint(backbone_dir), thought_tokens=2, compression_tokens=COMPRESSION,
        hidden_size=backbone.model.config.hidden_size, embedding_dim=EMBEDDING_DIM, prompts={"query": "Answer: "}, seed=seed,
    )
    model = LLM2VecGen(backbone, config)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def relative_to_repo(config_file: Path, backbone: Path) -> None:
    """Our folder names its backbone folder relative to the repository root (where tests run), not this machine's path."""
    config = json.loads(config_file.read_text())
    try:
        config["backbone"]["name"] = str(backbone.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return  # --out outside the working directory: keep the absolute path
    config_file.write_text(json.dumps(config, indent=2))


def compare(model, outputs_base: Path) -> dict:
    """Our vectors (at several batch sizes) and greedy ids against the official outputs in `outputs_base`."""
    from safetensors.torch import load_file

    official = load_file(str(outputs_base) + ".safetensors")
    meta = json.loads(Path(str(outputs_base) + ".json").read_text())
    texts = meta["texts"]
    figures = {}
    for batch_size in (1, 7, 64):
        ours = model.encode(texts, batch_size=batch_size, convert_to_tensor=True)
        figures[f"max_abs_diff_batch{batch_size}"] = (ours - official["single"]).abs().max().item()
    figures["official_batched_vs_single"] = (official["batched"] - official["single"]).abs().max().item()
    figures["official_batched_vs_single_cosine_min"] = torch.nn.functional.cosine_similarity(
        official["batched"], official["single"], dim=-1).min().item()
    ids = model.generate_ids(texts, max_new_tokens=meta["max_new_tokens"])
    figures["decoded_equal"] = sum(a == b for a, b in zip(ids, meta["decoded_ids"], strict=True))
    figures["texts"] = len(texts)
    return figures


def smollm2(python: Path, out: Path, count: int) -> dict:
    """Both directions on the real SmolLM2 weights (see the module docstring); the figures."""
    from benchmarks.training import transformers4_folder
    from components.backbone import load_backbone, resolve_folder
    from components.model import LLM2VecGen
    from components.official_format import save_official
    from components.spec import load_spec

    out = out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = load_spec("specs/smollm2-135m.yaml")
    folder, _ = resolve_folder(spec.backbone)
    transformers4_folder(folder, out / "backbone")  # the weights are linked, not copied
    texts, answers = mixed_texts(count), mixed_texts(max(count, 16), seed=1)
    special = [f"<question{i}>" for i in range(1, 21)]  # 10 thought + 10 compression, as the released models
    work = {"backbone": str(out / "backbone"), "special_tokens": special, "compression": 10, "embedding_dim": 384,
            "steps": 2, "lr": 1e-3, "seed": 0, "texts": answers, "answers": answers, "max_new_tokens": MAX_NEW_TOKENS,
            "batch_size": 8}
    report = {}
    run_official(python, "build", {**work, "model_dir": str(out / "official")}, out / "work.json")
    work["texts"] = texts
    run_official(python, "outputs", {**work, "model_dir": str(out / "official"), "outputs": str(out / "official_outputs")},
                 out / "work.json")
    backbone = load_backbone(spec.backbone)
    report["smollm2: official checkpoint, loaded by us"] = compare(LLM2VecGen.load(out / "official", backbone=backbone),
                                                                   out / "official_outputs")
    ours = LLM2VecGen.from_spec(spec, embedding_dim=384, backbone=backbone)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for parameter in ours.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    save_official(ours, out / "export", backbone_path=str(out / "backbone"))
    run_official(python, "outputs", {**work, "model_dir": str(out / "export"), "outputs": str(out / "export_outputs")},
                 out / "work.json")
    report["smollm2: our model exported, loaded by the official package"] = compare(ours, out / "export_outputs")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.official_checkpoints", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/official"))
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--smollm2", type=Path, default=None, help="instead: the SmolLM2 round trip, into this folder")
    parser.add_argument("--texts", type=int, default=16, help="with --smollm2: texts to compare")
    args = parser.parse_args(argv)

    from benchmarks.training import official_python
    from components.backbone import default_cache_dir
    from components.model import LLM2VecGen
    from components.official_format import save_official

    python = official_python(args.cache_dir or default_cache_dir())
    if args.smollm2:
        print(json.dumps(smollm2(python, args.smollm2, args.texts), indent=2))
        return 0
    texts = mixed_texts(64)
    answers = mixed_texts(64, seed=1)
    report = {}
    for index, architecture in enumerate(ARCHITECTURES):
        root = (args.out / architecture).resolve()
        root.mkdir(parents=True, exist_ok=True)
        save_backbone(architecture, root / "backbone")
        work = {
            "backbone": str(root / "backbone"), "special_tokens": SPECIAL_TOKENS, "compression": COMPRESSION,
            "embedding_dim": EMBEDDING_DIM, "steps": 6, "lr": 3e-2, "seed": index, "texts": texts, "answers": answers,
            "max_new_tokens": MAX_NEW_TOKENS, "batch_size": 16,
        }
        shutil.rmtree(root / "official", ignore_errors=True)
        run_official(python, "build", {**work, "model_dir": str(root / "official")}, root / "work.json")
        run_official(python, "outputs", {**work, "model_dir": str(root / "official"), "outputs": str(root / "official_outputs")},
                     root / "work.json")
        loaded = LLM2VecGen.load(root / "official")
        report[f"{architecture}: official checkpoint, loaded by us"] = compare(loaded, root / "official_outputs")

        ours = our_model(root / "backbone", seed=10 + index)
        shutil.rmtree(root / "ours", ignore_errors=True)
        shutil.rmtree(root / "export", ignore_errors=True)
        ours.save(root / "ours")
        relative_to_repo(root / "ours" / "llm2vec_gen.json", root / "backbone")
        save_official(ours, root / "export", backbone_path="../backbone")
        run_official(python, "outputs", {**work, "model_dir": str(root / "export"), "outputs": str(root / "export_outputs")},
                     root / "work.json")
        report[f"{architecture}: our model exported, loaded by the official package"] = compare(ours, root / "export_outputs")
        (root / "work.json").unlink()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
