"""What an embedding says: the text the frozen LLM writes from it, and a logit lens on its compression tokens.

    python -m workflows.inspect MODEL "some text" [--prompt-name query] [--max-new-tokens 48] [--top-k 5]

MODEL is a model folder or models:/<name>/<version>. Prints:
  - the decoded text: greedy generation by the frozen LLM fed only the C reconstruction-projected vectors z (model.decode);
  - per compression token i, the top tokens of the LLM's output head applied to
      z_i  (the vector the LLM reads when decoding; with tied embeddings, the vocabulary rows z_i points at), and
      h_i  (the backbone's final-normed last hidden state at that position: what the LLM would predict next there).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workflows.inspect", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model folder or models:/<name>/<version>")
    parser.add_argument("text", nargs="+", help="one or more texts to inspect")
    parser.add_argument("--prompt-name", default=None,
                        help="instruction from the model folder ('' for none; default: 'query' when the folder has one)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--top-k", type=int, default=5)
    return parser.parse_args(argv)


def format_tokens(tokens: list[tuple[str, float]]) -> str:
    return "  ".join(f"{token!r} {probability:.2f}" for token, probability in tokens)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from components.evaluation.lens import logit_lens
    from components.model import LLM2VecGen
    from components.tracking import resolve_model

    model = LLM2VecGen.load(resolve_model(args.model)).eval()
    if args.prompt_name is None:  # the folder's query instruction, where it has one
        prompt_name = "query" if "query" in model.config.prompts else None
    else:
        prompt_name = args.prompt_name or None
    if prompt_name is not None and prompt_name not in model.config.prompts:
        print(f"error: --prompt-name {prompt_name!r} is not one of {sorted(model.config.prompts)}", file=sys.stderr)
        return 2
    for text in args.text:
        prompt = model.config.prompts.get(prompt_name, "") if prompt_name else ""
        print(f"== {text!r}" + (f" (instruction {prompt!r})" if prompt else ""))
        decoded = model.decode(text, max_new_tokens=args.max_new_tokens, prompt_name=prompt_name)
        print(f"decodes to: {decoded!r}")
        print("logit lens per compression token (top tokens of W_U z_i | of W_U h_i, with probabilities):")
        for row in logit_lens(model, text, top_k=args.top_k, prompt_name=prompt_name):
            print(f"  c{row.position:<3} z: {format_tokens(row.z_tokens)}")
            print(f"       h: {format_tokens(row.h_tokens)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
