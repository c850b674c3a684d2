"""Talking to a model through its chat template: where a turn ends.

    stop_ids = end_of_turn_ids(tokenizer, chat_template)   # [eos, then the template's end-of-turn ids]

The export's generation_config.json, `phi-jax chat` and serving stop a reply on any of these.
Only jinja2 and tokenizers are imported (through phi_jax.data.chat).
"""

from phi_jax.data import chat

# An assistant reply no template alters; what the template writes after it ends the turn.
_PROBE_REPLY = "Probe reply 7f3a."


def end_of_turn_ids(tokenizer, chat_template: str | None) -> list[int]:
    """The tokenizer's end of text, then each special token a template writes right after an assistant
    reply (<|im_end|> for ChatML, <|eot_id|> for Llama 3; phi's Puffin-style turn ends with the end of text
    itself). `tokenizer` is a phi_jax.data.tokenizer.Tokenizer; `chat_template` a Jinja source or None."""
    ids = [tokenizer.eos_id]
    if chat_template is None:
        return ids
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
