"""The official step's float64 outputs on a fixed tiny batch, committed for tests/test_official_step.py.

    python -m benchmarks.official_fixture [--out tests/data/official_step_tiny.safetensors]

Builds the tiny random backbone of specs/tiny.yaml (llama, seeded: the same weights every time, identified by
its fingerprint), our LLM2VecGen on it with its seeded starting weights, and a fixed batch (ROWS: four rows of
different query and answer lengths, one answer cut at the cap); writes them where the official worker reads
them (benchmarks/_official_step.py, in the official venv that benchmarks.training.official_python builds:
llm2vec-gen 0.1.3, transformers 4.56.2, peft 0.18.0), and runs its float64 check: forward + backward of
1 * reconstruction CE + 1 * alignment MSE, no update. The fixture holds the starting weights, the teacher
vectors, the official losses and the official gradients of every trained tensor (float64), and as metadata the
rows with their token ids, the backbone's fingerprint and the official versions. Nothing of ours computes a
number in it: our side only tokenises (the official worker checks the special-token ids against its tokenizer's).

The test then runs our step in float64 on the same batch and weights (benchmarks.training.float64_model) and
compares, so that a change to our training step cannot drift from the official one unnoticed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "official_step_tiny.safetensors"
SPEC = "specs/tiny.yaml"
EMBEDDING_DIM = 16
CAP = 48  # answer tokens (EOS included), as training.max_response_tokens caps them
# Mixed lengths, so that both sides pad (we right-pad answers and left-pad queries, the official code left-pads
# both): the padding conventions are what the check must show to be equivalent. The last answer is cut at CAP.
ROWS = [
    {"query": "who wrote the book the origin of species", "response": "Charles Darwin wrote it in 1859."},
    {"query": "when was the eiffel tower built",
     "response": "The Eiffel Tower was built between 1887 and 1889 for the World's Fair in Paris."},
    {"query": "capital of peru", "response": "Lima."},
    {"query": "how many legs does a spider have and why do they have so many of them",
     "response": "A spider has eight legs. " * 4},
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.official_fixture", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    from safetensors.torch import load_file, save_file

    from benchmarks.training import Worker, official_python, transformers4_folder, worker_env
    from components.backbone import default_cache_dir, load_backbone
    from components.model import LLM2VecGen
    from components.spec import load_spec

    spec = load_spec(SPEC)
    python = official_python(default_cache_dir())
    backbone = load_backbone(spec.backbone)
    model = LLM2VecGen.from_spec(spec, embedding_dim=EMBEDDING_DIM, backbone=backbone)
    generator = torch.Generator().manual_seed(0)
    teacher = torch.nn.functional.normalize(torch.randn(len(ROWS), EMBEDDING_DIM, generator=generator), dim=-1)
    batch = model.collate([r["query"] for r in ROWS], [r["response"] for r in ROWS], teacher, CAP)
    rows = [
        {**row, "query_ids": batch.query_ids[i][batch.query_mask[i].bool()].tolist(),
         "response_ids": batch.response_ids[i][batch.response_mask[i].bool()].tolist()}
        for i, row in enumerate(ROWS)
    ]
    init = {name: value.detach().contiguous() for name, value in model.state_dict().items()}

    workdir = Path(tempfile.mkdtemp(prefix="llm2vec-gen-official-fixture-"))
    worker = None
    try:
        hf = workdir / "backbone-transformers5"
        backbone.model.save_pretrained(hf)
        backbone.tokenizer.save_pretrained(hf)
        transformers4_folder(hf, workdir / "backbone-transformers4")
        save_file(init, workdir / "init.safetensors")
        save_file({"teacher": teacher}, workdir / "teacher.safetensors")
        meta = {
            "special_tokens": model.config.special_tokens,
            "special_ids": model.tokenizer.convert_tokens_to_ids(model.config.special_tokens),
            "pad_id": model.tokenizer.pad_token_id,
            "compression_tokens": model.config.compression_tokens,
            "lr": spec.training.lr, "weight_decay": spec.training.weight_decay, "grad_clip": spec.training.grad_clip,
            "weights": [spec.loss.reconstruction, spec.loss.alignment],
            "rows": [{"query_ids": r["query_ids"], "response_ids": r["response_ids"]} for r in rows],
            "embedding_dim": EMBEDDING_DIM,
        }
        (workdir / "meta.json").write_text(json.dumps(meta))
        worker = Worker("official-float64", [str(python), "-I", str(ROOT / "benchmarks" / "_official_step.py"), str(workdir),
                                             "--checkpointing", "on", "--dtype", "float64"],
                        workdir / "official.log", worker_env(1))
        described = worker.receive()
        losses = worker.call(cmd="check", rows=list(range(len(rows))), grads_file=str(workdir / "grads.safetensors"))
        grads = load_file(workdir / "grads.safetensors")
    finally:
        if worker is not None:
            worker.close()
        shutil.rmtree(workdir, ignore_errors=True)

    tensors = {f"init.{name}": value for name, value in init.items()}
    tensors |= {"teacher": teacher}
    tensors |= {f"grad.{name}": value.to(torch.float64).contiguous() for name, value in grads.items()}
    tensors |= {f"loss.{name}": torch.tensor(losses[name], dtype=torch.float64) for name in ("reconstruction", "alignment")}
    metadata = {
        "rows": json.dumps(rows),
        "cap": str(CAP),
        "spec": SPEC,
        "embedding_dim": str(EMBEDDING_DIM),
        "backbone_fingerprint": backbone.fingerprint,
        "official": described["versions"],
        "made_by": "python -m benchmarks.official_fixture",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out, metadata=metadata)
    print(f"{args.out}: official float64 losses reconstruction {losses['reconstruction']!r} alignment "
          f"{losses['alignment']!r}; gradients of {sorted(grads)} ({described['versions']})", file=sys.stderr)


if __name__ == "__main__":
    main()
