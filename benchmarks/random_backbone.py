"""A backbone folder with a real model's config and tokenizer but seeded random weights, for throughput runs.

    python -m benchmarks.random_backbone SOURCE_FOLDER TARGET_FOLDER

Serving and encoding throughput depend on the shapes only (the embeddings route has no data-dependent control
flow), so a machine that cannot take the real weights (a GPU box reached by a size-limited copy: SmolLM2's
GGUF is 93 MiB) can still measure the real architecture: SOURCE_FOLDER needs config.json and the tokenizer
files (e.g. the converted GGUF folder under ~/.cache/llm2vec-gen-ray/gguf/), and the result is used with
`--set backbone.source=folder --set backbone.name=TARGET_FOLDER`. Not for anything whose output is read.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COPIED = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    source, target = Path(args[0]), Path(args[1])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    model.save_pretrained(target)
    for name in COPIED:
        if (source / name).exists():
            shutil.copy(source / name, target / name)
    print(f"random backbone: {target} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
