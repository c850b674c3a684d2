"""Talking to a model through its chat template: where a turn ends, and `phi-jax chat`.

    stop_ids = end_of_turn_ids(tokenizer, chat_template)   # [eos, then the template's end-of-turn ids]
    session = Chat(config, params, tokenizer, chat_template, system="Be brief.")
    session.reply("What is 2 + 2?")                          # the whole conversation, rendered again

    phi-jax chat demo_out/run                                # interactive: /reset starts over, /exit or ^D ends
    phi-jax chat sft_run --message "Hi" --message "And then?" --system "Be brief."   # scripted turns

Each turn renders the whole conversation with the template (add_generation_prompt) exactly as
transformers would, and the reply stops at the end of text or any of the template's end-of-turn
tokens; the export's generation_config.json stops on the same ids. Only jinja2 and tokenizers are
imported besides the model (through phi_jax.data.chat, when a template is read: `phi-jax` itself
starts without jinja2).
"""

import argparse
import dataclasses
import logging
import pathlib
import sys

from phi_jax.config import PhiConfig
from phi_jax.data.tokenizer import TOKENIZER_FLAG_HELP, Tokenizer, resolve_tokenizer

logger = logging.getLogger(__name__)

# An assistant reply no template alters; what the template writes after it ends the turn.
_PROBE_REPLY = "Probe reply 7f3a."


def end_of_turn_ids(tokenizer: Tokenizer, chat_template: str | None) -> list[int]:
    """The tokenizer's end of text, then each special token a template writes right after an assistant
    reply (<|im_end|> for ChatML, <|eot_id|> for Llama 3; phi's Puffin-style turn ends with the end of text
    itself). `chat_template` is a Jinja source or None."""
    ids = [tokenizer.eos_id]
    if chat_template is None:
        return ids
    from phi_jax.data import chat

    messages = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": _PROBE_REPLY}]
    text, _ = chat.render(messages, chat_template, chat.special_tokens(tokenizer.path.parent))
    if _PROBE_REPLY not in text:
        raise chat.ChatError(f"chat template: an assistant reply {_PROBE_REPLY!r} does not appear in what it renders "
                             f"({text[:200]!r}), so where a turn ends cannot be found")
    after = text[text.rindex(_PROBE_REPLY) + len(_PROBE_REPLY):]
    first_special = next((i for i in tokenizer.encode(after) if i in tokenizer.special_ids), None)
    if first_special is not None and first_special not in ids:
        ids.append(first_special)
    return ids


def find_template(chat_template, checkpoint, tokenizer: Tokenizer | None) -> str | None:
    """The chat template to use: `chat_template` (a built-in name, a .jinja file, a tokenizer_config.json
    or a Jinja string), else the checkpoint directory's own, else its tokenizer's; None when none has one."""
    from phi_jax.data import chat

    if chat_template is not None:
        return chat.resolve_template(chat_template, tokenizer.path.parent if tokenizer else None)
    if checkpoint is not None and pathlib.Path(checkpoint).is_dir():
        own = chat.find_chat_template(checkpoint)
        if own is not None:
            return own
    return chat.find_chat_template(tokenizer.path.parent) if tokenizer is not None else None


@dataclasses.dataclass
class Chat:
    """A conversation with a model: `reply(text)` adds the user's turn and the model's answer."""
    config: PhiConfig
    params: dict
    tokenizer: Tokenizer
    chat_template: str
    system: str | None = None
    max_new_tokens: int = 256
    sampling: dict = dataclasses.field(default_factory=dict)  # temperature, top_k, top_p
    seed: int = 0
    messages: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.stop_ids = end_of_turn_ids(self.tokenizer, self.chat_template)
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        """The conversation so far, rendered for the assistant's next turn."""
        from phi_jax.data import chat

        ids, _ = chat.encode_chat(self.messages, self.tokenizer.path, self.chat_template, add_generation_prompt=True)
        return ids

    def reply(self, text: str) -> str:
        from phi_jax.generate import complete

        self.messages.append({"role": "user", "content": text})
        ids = self.prompt_ids()
        room = self.config.max_position_embeddings - len(ids)
        if room < 1:
            self.messages.pop()
            raise ValueError(f"the conversation is {len(ids)} tokens, the model's whole context "
                             f"(max_position_embeddings={self.config.max_position_embeddings}); start over (/reset)")
        turn = sum(m["role"] == "user" for m in self.messages)
        new_ids = complete(self.config, self.params, [ids], min(self.max_new_tokens, room), batch_size=1,
                           seed=self.seed + turn, stop_ids=self.stop_ids, **self.sampling)[0]
        answer = self.tokenizer.decode(new_ids).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def run(args):
    from phi_jax.checkpoint import load_model
    from phi_jax.data import chat

    tokenizer = resolve_tokenizer(args.tokenizer, args.ckpt)
    template = find_template(args.chat_template, args.ckpt, tokenizer)
    if template is None:
        raise chat.ChatError(f"{args.ckpt}: no chat template (none stored with the run or its tokenizer); pass "
                             f"--chat_template ({', '.join(chat.TEMPLATES)}, a .jinja file or a tokenizer_config.json)")
    config, params = load_model(args.ckpt, args.step)
    session = Chat(config, params, tokenizer, template, system=args.system, max_new_tokens=args.max_new_tokens,
                   sampling=dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p), seed=args.seed)
    if args.message:
        for text in args.message:
            print(session.reply(text), flush=True)
        return
    _interact(session)


def _interact(session: Chat):
    """Reads a turn a line from stdin (prompts on stderr), prints each reply on stdout."""
    print("chat: type a message; /reset starts over, /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            session.reset()
            logger.info("a new conversation")
            continue
        if not text.strip():
            continue
        try:
            print(session.reply(text), flush=True)
        except ValueError as e:  # a turn the template refuses, or a conversation past the context: say so, go on
            print(f"error: {e}", file=sys.stderr)


def add_command(commands):
    from phi_jax.cli import positive_int

    p = commands.add_parser("chat", help="talk to a model through its chat template (interactive, or --message)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a training workdir, params checkpoint or Hugging Face directory")
    p.add_argument("--step", type=int, help="with a training workdir: this step rather than the latest")
    p.add_argument("--message", action="append", help="a user turn; repeatable; prints each reply and exits")
    p.add_argument("--system", help="a system message to start the conversation with")
    p.add_argument("--tokenizer", help=TOKENIZER_FLAG_HELP)
    p.add_argument("--chat_template", help="'phi', 'chatml', a .jinja file, a tokenizer_config.json or a Jinja "
                                           "string (default: the run's own, else its tokenizer's)")
    p.add_argument("--max_new_tokens", type=positive_int, default=256, help="the longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)
