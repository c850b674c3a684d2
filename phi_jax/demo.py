"""`make demo`: the main job that works today, end to end, offline.

1. make a tiny random transformers PhiForCausalLM (phi vocabulary, 2 layers) and save it;
2. `phi-jax import-hf` it into a phi-jax params checkpoint;
3. `phi-jax generate` greedily from it, and check the tokens against transformers' own generate;
4. `phi-jax export-hf` it back, reload with transformers, and check the logits.

Needs the `hf` extra (transformers, torch). The training issue replaces this with training
experiments/tiny_cpu.gin on the built-in corpus.
"""

import argparse
import contextlib
import io
import pathlib

import numpy as np

from phi_jax import cli
from phi_jax.config import PHI_EOS_ID, tiny

PROMPT_IDS = [PHI_EOS_ID, 464, 2068, 7586, 21831, 18045, 625, 262]
NEW_TOKENS = 16


def _run_cli(argv) -> str:
    print("$ phi-jax " + " ".join(argv))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(argv)
    print(out.getvalue(), end="")
    if status:
        raise SystemExit(f"demo: phi-jax {argv[0]} failed")
    return out.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="directory for everything the demo writes")
    out = pathlib.Path(parser.parse_args(argv).out)

    import torch
    import transformers

    config = tiny()
    torch.manual_seed(0)
    hf_config = transformers.PhiConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        partial_rotary_factor=config.rotary_dim / config.head_dim, bos_token_id=PHI_EOS_ID, eos_token_id=PHI_EOS_ID)
    reference = transformers.PhiForCausalLM(hf_config).eval()
    src = out / "hf_random"
    reference.save_pretrained(src)
    print(f"1. saved a random transformers PhiForCausalLM ({config.num_params:,} parameters) to {src}")

    print("2. import it")
    _run_cli(["import-hf", str(src), str(out / "params"), "--overwrite"])

    print("3. generate greedily with the KV cache")
    ours = _run_cli(["generate", str(out / "params"), "--prompt_ids", ",".join(map(str, PROMPT_IDS)),
                     "--max_new_tokens", str(NEW_TOKENS)])
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                    min_new_tokens=NEW_TOKENS, pad_token_id=PHI_EOS_ID)
    theirs = " ".join(map(str, theirs[0, len(PROMPT_IDS):].tolist()))
    print(f"   transformers generate gives the same tokens: {ours.strip() == theirs}")

    print("4. export it back to Hugging Face format and reload it with transformers")
    _run_cli(["export-hf", str(out / "params"), str(out / "hf_export"), "--overwrite"])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out / "hf_export").eval()
    tokens = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        difference = np.abs(reloaded(tokens).logits.numpy() - reference(tokens).logits.numpy()).max()
    print(f"   max |logit difference| after the round trip: {difference:.2e}")
    if ours.strip() != theirs or difference > 1e-5:
        raise SystemExit("demo: phi-jax and transformers disagree")


if __name__ == "__main__":
    main()
