"""Write a model folder in another layout: the official llm2vec-gen one, or ours.

    python -m workflows.export MODEL OUT --format official [--backbone-path PATH_OR_HUB_ID]
    python -m workflows.export McGill-NLP/LLM2Vec-Gen-Qwen3-0.6B OUT --format ours

MODEL is anything LLM2VecGen.load reads: our folder, models:/<name>/<version>, an official folder or hub id.
--format official writes run_config.yml, the tokenizer, encoder/ (a PEFT TrainableTokens adapter), reconstruction_mlp,
alignment_mlp and encoder_decoder_config.json, so that `LLM2VecGenModel.from_pretrained(OUT)` of llm2vec-gen 0.1.3
loads it and encodes the same (components/official_format.py). --format ours writes llm2vec_gen.json and
trainable.safetensors (no pickle), e.g. to serve a released model without its hub repo.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workflows.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model folder, models:/<name>/<version>, an official folder or hub id")
    parser.add_argument("out", help="the folder to write (created; files in it are overwritten)")
    parser.add_argument("--format", choices=["official", "ours"], required=True)
    parser.add_argument("--backbone-path", default=None,
                        help="official only: run_config's model_name_or_path (default: the backbone's hub id or local folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from components.model import LLM2VecGen
    from components.official_format import OfficialFormatError, save_official
    from components.tracking import resolve_model

    try:
        model = LLM2VecGen.load(resolve_model(args.model))
        if args.format == "official":
            out = save_official(model, args.out, backbone_path=args.backbone_path)
        else:
            out = model.save(args.out)
    except (OfficialFormatError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} folder {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
