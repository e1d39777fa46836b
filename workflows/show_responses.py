"""Print what the generate stage produced for a spec: rendered prompts, responses and token counts.

    python -m workflows.show_responses SPEC [-n 5] [--set key=value ...]

Reads the shards written so far, so it also works on an unfinished run. Prompts are rendered again with the
backbone's tokenizer, exactly as the generator rendered them.
"""

from __future__ import annotations

import argparse
import sys

import pyarrow.parquet as pq

from components.generation import load_tokenizer, render_prompt
from workflows._cli import add_spec_arguments, spec_from_args
from workflows.generate import plan_generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.show_responses", description=__doc__.split("\n\n")[0])
    add_spec_arguments(parser)
    parser.add_argument("-n", type=int, default=5, help="how many rows to show (lowest ids first)")
    args = parser.parse_args(argv)
    spec = spec_from_args(args)
    if spec is None:
        return 2
    output, _ = plan_generate(spec, create=False)
    present = [path for path in output.shard_paths() if path.is_file()]
    if not present:
        print(f"no responses yet in {output.folder}; run: python -m workflows.generate {args.spec}", file=sys.stderr)
        return 1
    state = "complete" if output.complete else f"{len(present)} of {output.num_shards} shards written"
    print(f"{output.folder} ({state}; {output.num_rows} queries)")
    tokenizer = load_tokenizer(spec.backbone)
    shown = 0
    for path in present:
        for row in pq.read_table(path).to_pylist():
            if shown == args.n:
                return 0
            print(f"\n--- id {row['id']}: {row['prompt_tokens']} prompt tokens, {row['response_tokens']} response "
                  f"tokens, finish_reason {row['finish_reason']}")
            print(render_prompt(tokenizer, row["query"], spec.generation), end="")
            print(row["response"])
            shown += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
