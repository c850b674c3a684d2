"""`make demo`: the main job, end to end, offline, on the embedded default.

1. `phi-jax train` experiments/tiny_cpu.gin: a tiny phi on the built-in corpus (Python's own
   stdlib code and docs, plus our synthetic textbook lessons), a few minutes on 2 CPU cores;
2. `phi-jax export-hf` the trained model to the transformers layout, reload it with transformers
   and check that its logits and greedy tokens are ours;
3. `phi-jax generate` a sample from the trained model.

Re-running resumes the finished run (nothing to train) and redoes steps 2 and 3.
"""

import argparse
import contextlib
import io
import pathlib

import numpy as np

from phi_jax import checkpoint, cli

EXPERIMENT = "experiments/tiny_cpu.gin"
PROMPTS = ["def fibonacci(n):\n", "Lesson 3: Fractions.\n"]
NEW_TOKENS = 48


def _run_cli(argv, capture: bool = False) -> str:
    print("$ phi-jax " + " ".join(argv), flush=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out) if capture else contextlib.nullcontext():
        status = cli.main(argv)
    if status:
        raise SystemExit(f"demo: phi-jax {argv[0]} failed")
    return out.getvalue()


def _check_against_transformers(hf_dir: pathlib.Path, run_dir: pathlib.Path):
    import jax.numpy as jnp
    import torch
    import transformers

    from phi_jax.data import load_tokenizer
    from phi_jax.generate import generate
    from phi_jax.model import Phi

    config, params = checkpoint.load_model(run_dir)
    tokens = load_tokenizer(None).encode(PROMPTS[0])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        their_logits = theirs(torch.tensor([tokens])).logits.numpy()
        their_tokens = theirs.generate(torch.tensor([tokens]), max_new_tokens=16, min_new_tokens=16,
                                       do_sample=False, pad_token_id=0)[0].tolist()
    our_logits = np.asarray(Phi(config).apply({"params": params}, jnp.asarray([tokens])))
    our_tokens = generate(config, params, jnp.asarray([tokens]), 16)[0].tolist()
    difference = np.abs(our_logits - their_logits).max()
    print(f"   transformers on the export: max |logit difference| {difference:.1e}, "
          f"same greedy tokens: {our_tokens == their_tokens}")
    if difference > 1e-4 or our_tokens != their_tokens:
        raise SystemExit("demo: the exported model and phi-jax disagree")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="directory for everything the demo writes")
    parser.add_argument("--train_steps", type=int, help="override the experiment's TRAIN_STEPS")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    run_dir, hf_dir = out / "run", out / "hf"

    print(f"1. train {EXPERIMENT} into {run_dir}")
    overrides = [f"--gin.TRAIN_STEPS={args.train_steps}"] if args.train_steps else []
    _run_cli(["train", f"--gin_file={EXPERIMENT}", f"--workdir={run_dir}", *overrides])

    print("2. export to Hugging Face format and check it with transformers")
    _run_cli(["export-hf", str(run_dir), str(hf_dir), "--overwrite"])
    _check_against_transformers(hf_dir, run_dir)

    print("3. sample from the trained model")
    for prompt in PROMPTS:
        text = _run_cli(["generate", str(run_dir), "--prompt", prompt, "--tokenizer", "default",
                         "--max_new_tokens", str(NEW_TOKENS), "--temperature", "0.7",
                         "--ignore_eos"], capture=True)
        print("   " + text.replace("\n", "\n   "))


if __name__ == "__main__":
    main()
