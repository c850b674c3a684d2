"""What tests/test_synth.py and tests/test_synth_serve.py share: a tiny random phi with its own BPE, and
small topics files."""

import json

WORDS = ("the river carries water from the mountains to the sea and plants grow along its banks "
         "def add(a, b): return a + b  a list holds numbers in order; a loop visits each one").split()


def make_tiny_model(path):
    """A random tiny phi (1024-token context) at `path`, with a 300-id BPE as path/tokenizer.json."""
    import jax

    from phi_jax import checkpoint, tiny
    from phi_jax.data.tokenizer import train_byte_level_bpe
    from phi_jax.model import init_params

    config = tiny(vocab_size=300, hidden_size=32, intermediate_size=64, num_heads=2, head_dim=16, rotary_dim=8,
                  max_position_embeddings=1024)
    checkpoint.save_params(path, config, init_params(config, jax.random.key(0)))
    train_byte_level_bpe([" ".join(WORDS)] * 20, 300, path / "tokenizer.json")
    return path


def topics_file(tmp_path, names=("rivers", "lists in Python", "fractions")):
    path = tmp_path / "topics.txt"
    path.write_text("# my topics\n\n" + "\n".join(names) + "\n")
    return path


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
