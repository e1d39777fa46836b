"""The official package's side of benchmarks/official_checkpoints.py, run inside its own venv.

    <official-venv>/bin/python -I benchmarks/_official_checkpoint_side.py build WORK.json
    <official-venv>/bin/python -I benchmarks/_official_checkpoint_side.py outputs WORK.json

This file imports nothing from this repository: it runs on `llm2vec-gen==0.1.3` with its pins (transformers 4.56.2,
peft 0.18.0) and torch 2.13.0 CPU.

build    an LLM2Vec-Gen model on a tiny backbone folder, built as the package's scripts/train.py builds it
         (tokenizer + special tokens, padding side left, AutoModel + resize_token_embeddings + TrainableTokens on the
         special ids, a separate frozen AutoModelForCausalLM decoder, ProjectionModel heads, EncoderDecoderModel with
         encoding_mode last_<C>_tokens), trained a few AdamW steps on the package's own loss (the EncoderDecoderModel
         call's decoder cross-entropy + compute_mse_loss) so that no row or head is at its initial value, then saved
         with EncoderDecoderModel.save_pretrained, tokenizer.save_pretrained and run_config.yml (utils.save_args_to_yaml).
outputs  LLM2VecGenModel.from_pretrained(model folder) (run with the folder as working directory, so the relative
         model_name_or_path resolves as it does for us), then for every text: `encode` one text at a time, `encode` in
         batches (its left padding shifts positions: the vectors depend on the batch), and greedy decoding of the
         text's reconstruction states by EncoderDecoderModel.generate (LLM2VecGenModel.generate moves inputs to "cuda"
         unconditionally, so the loop under it is called directly, batch 1, as LLM2VecGenModel.generate calls it).

WORK.json says what to do: {"backbone", "model_dir", "special_tokens", "compression", "embedding_dim", "steps", "lr",
"seed", "texts", "answers", "max_new_tokens", "batch_size", "outputs"}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def build(work: dict) -> None:
    import torch
    from llm2vec_gen.losses import compute_mse_loss
    from llm2vec_gen.models import EncoderDecoderModel, ProjectionModel
    from llm2vec_gen.utils import save_args_to_yaml
    from peft import TrainableTokensConfig, get_peft_model
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(work["seed"])
    backbone = work["backbone"]
    special_tokens = work["special_tokens"]
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens})
    config = AutoConfig.from_pretrained(backbone)
    config.num_special_tokens = len(special_tokens)
    config.special_tokens_ids = tokenizer.convert_tokens_to_ids(special_tokens)
    encoder = AutoModel.from_pretrained(backbone, config=config, torch_dtype=torch.float32)
    encoder.resize_token_embeddings(len(tokenizer))
    encoder = get_peft_model(encoder, peft_config=TrainableTokensConfig(token_indices=config.special_tokens_ids))
    decoder = AutoModelForCausalLM.from_pretrained(backbone, torch_dtype=torch.float32)
    decoder.requires_grad_(False)
    hidden = config.hidden_size
    model = EncoderDecoderModel(
        encoder_model=encoder,
        decoder_model=decoder,
        encoding_mode=f"last_{work['compression']}_tokens",
        reconstruction_mlp=ProjectionModel(input_dim=hidden, output_dim=hidden, dtype=torch.float32),
        alignment_mlp=ProjectionModel(input_dim=hidden, output_dim=work["embedding_dim"], dtype=torch.float32),
        save_decoder=False,
    )
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=work["lr"])
    queries, answers = work["texts"], work["answers"]
    teacher = torch.randn(len(queries), work["embedding_dim"])
    model.train()
    batch = 8
    for step in range(work["steps"]):
        rows = [(step * batch + i) % len(queries) for i in range(batch)]
        # As the package's CustomCollator lays a batch out: everything left-padded, the special ids after the query.
        query = tokenizer([queries[i] + "".join(special_tokens) for i in rows], padding=True, return_tensors="pt")
        answer = tokenizer([answers[i] + tokenizer.eos_token for i in rows], padding=True, return_tensors="pt")
        labels = answer["input_ids"].masked_fill(answer["attention_mask"] == 0, -100)
        states, outputs = model(
            query_input_ids=query["input_ids"],
            query_attention_mask=query["attention_mask"],
            answer_input_ids=answer["input_ids"],
            answer_attention_mask=answer["attention_mask"],
            labels=labels,
        )
        alignment, _ = compute_mse_loss(states.mean(dim=1), teacher[rows], mse_loss_weight=1.0)
        loss = outputs["loss"] + alignment
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step}: loss {loss.item():.4f}", file=sys.stderr)
    model.eval()
    out = Path(work["model_dir"])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    save_args_to_yaml(
        {
            "model_name_or_path": os.path.relpath(backbone, out),
            "torch_dtype": "float32",
            "special_tokens": special_tokens,
            "encoding_mode": f"last_{work['compression']}_tokens",
            "max_input_length": 512,
        },
        str(out),
        name="run_config.yml",
    )


def outputs(work: dict) -> None:
    import peft
    import torch
    import transformers
    from llm2vec_gen import LLM2VecGenModel
    from safetensors.torch import save_file

    model_dir = Path(work["model_dir"]).resolve()
    os.chdir(model_dir)  # run_config's model_name_or_path is relative to the model folder
    model = LLM2VecGenModel.from_pretrained(".")
    model.model.eval()
    texts = work["texts"]
    single = torch.cat([model.encode(text) for text in texts])  # (N, D)
    size = work["batch_size"]
    batched = torch.cat([model.encode(texts[start : start + size]) for start in range(0, len(texts), size)])
    decoded, recon = [], []
    dummy = torch.zeros(1, 1, dtype=torch.long)
    for text in texts:
        _, states = model.encode(text, get_recon_hidden_states=True)  # (1, C, H)
        ids = model.model.generate(
            input_ids=dummy, attention_mask=dummy, max_new_tokens=work["max_new_tokens"], decoder_inputs_embeds=states
        )
        decoded.append(ids[0].tolist())
        recon.append(states[0])
    save_file(
        {"single": single.float().contiguous(), "batched": batched.float().contiguous(), "z": torch.stack(recon).float()},
        work["outputs"] + ".safetensors",
    )
    Path(work["outputs"] + ".json").write_text(json.dumps({
        "versions": f"llm2vec-gen 0.1.3, transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}",
        "batch_size": size,
        "max_new_tokens": work["max_new_tokens"],
        "texts": texts,
        "decoded_ids": decoded,
        "decoded_text": model.tokenizer.batch_decode([torch.tensor(ids) for ids in decoded], skip_special_tokens=True),
    }, indent=1))


if __name__ == "__main__":
    command, work_file = sys.argv[1], sys.argv[2]
    {"build": build, "outputs": outputs}[command](json.loads(Path(work_file).read_text()))
