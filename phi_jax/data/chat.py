"""Chat conversations as token ids and an assistant mask, exactly as transformers makes them.

    ids, assistant_mask = encode_chat(messages, tokenizer, chat_template=None, add_generation_prompt=False)

equals `AutoTokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
return_assistant_tokens_mask=True)` (transformers 5): the template is rendered in the same Jinja
environment (jinja2's ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, loop controls,
the `{% generation %}` tag, `raise_exception`, `strftime_now`, a restricted `dict` and `namespace`,
and `tojson` without HTML escaping), with the same variables (messages, tools, documents,
add_generation_prompt and the tokenizer's named special tokens); the whole conversation is tokenized
once, and a token is in the mask when its characters overlap a `{% generation %}` block. Rendering
turn by turn and tokenizing each piece would disagree with transformers where tokens cross a turn.

`tokenizer` is a tokenizer directory (tokenizer.json, with tokenizer_config.json and
chat_template.jinja when it has them) or a tokenizer.json. `chat_template` is a Jinja string, the
name of a built-in template (TEMPLATES: `phi`, `chatml`), a .jinja file or a tokenizer_config.json;
None is the tokenizer's own (find_chat_template).

Only jinja2 and tokenizers are imported: `phi-jax serve` uses this without TensorFlow or seqio.
"""

import contextlib
import contextvars
import datetime
import functools
import json
import pathlib
import re

import jinja2
import jinja2.ext
import jinja2.sandbox

from phi_jax.errors import PhiJaxError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"
# The named special tokens transformers hands a template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
KNOWN_ROLES = ("system", "user", "assistant", "tool")
# Older names of a message's reasoning that transformers copies to `reasoning_content` (and `thinking`).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Puffin-Phi style: plain text turns, phi's vocabulary as it is; an assistant turn ends with <|endoftext|>,
# which it learns to produce. The prompt for a reply ends with "ASSISTANT:" and the reply starts with a space.
PHI_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'SYSTEM: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT:' }}"
    "{% generation %}{{ ' ' + message['content'] + '<|endoftext|>' }}{% endgeneration %}"
    "{% else %}{{ raise_exception('the phi chat template has no role ' + message['role'] "
    "+ ' (it has system, user and assistant)') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# ChatML: <|im_start|>role\n ... <|im_end|>\n; the assistant's <|im_end|> is its end of turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('the chatml chat template has no role ' + message['role'] "
    "+ ' (it has system, user and assistant)') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATES = {"phi": PHI_TEMPLATE, "chatml": CHATML_TEMPLATE}
# The tokens each built-in template needs beyond the base vocabulary, and its end-of-turn token.
TEMPLATE_TOKENS = {"phi": (), "chatml": ("<|im_start|>", "<|im_end|>")}
END_OF_TURN = {"phi": "<|endoftext|>", "chatml": "<|im_end|>"}


class ChatError(PhiJaxError, ValueError):
    """A conversation or chat template that cannot be encoded: the message says which and why."""


# --------------------------------------------------------------------------------------------- templates


def find_chat_template(path) -> str | None:
    """The chat template of a tokenizer or model directory, as transformers finds it: chat_template.jinja,
    else tokenizer_config.json's `chat_template` (its "default" when it holds several); also under
    `path`/prepared (a DATA_DIR). `path` may be a tokenizer.json (its directory is read), a .jinja file or
    a tokenizer_config.json. None when there is none."""
    path = pathlib.Path(path).expanduser()
    if path.is_file():
        if path.suffix == ".jinja":
            return path.read_text()
        if path.name != TOKENIZER_FILE:
            return _config_template(path)
        path = path.parent
    for directory in (path, path / "prepared"):
        if (directory / TEMPLATE_FILE).is_file():
            return (directory / TEMPLATE_FILE).read_text()
        if (directory / CONFIG_FILE).is_file():
            template = _config_template(directory / CONFIG_FILE)
            if template is not None:
                return template
    return None


def _config_template(config_file: pathlib.Path) -> str | None:
    template = _read_json(config_file).get("chat_template")
    if isinstance(template, list):  # [{"name", "template"}]: transformers takes "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ChatError(f"{config_file}: chat_template holds the templates {sorted(map(str, named))} and none "
                            "is named 'default'; pass the one to use as chat_template")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ChatError(f"{config_file}: chat_template is a {type(template).__name__}, expected a Jinja string")
    return template


def resolve_template(chat_template, tokenizer_path=None) -> str:
    """The Jinja source `chat_template` names (see the module doc); None is the tokenizer's own."""
    if chat_template is None:
        found = find_chat_template(tokenizer_path) if tokenizer_path is not None else None
        if found is None:
            raise ChatError(f"{tokenizer_path}: no chat template there (no {TEMPLATE_FILE}, no chat_template in "
                            f"{CONFIG_FILE}); give one: {' or '.join(map(repr, TEMPLATES))}, a .jinja file, a "
                            f"{CONFIG_FILE} or a Jinja string")
        return found
    chat_template = str(chat_template)
    if chat_template in TEMPLATES:
        return TEMPLATES[chat_template]
    if "{" not in chat_template and "\n" not in chat_template:
        path = pathlib.Path(chat_template).expanduser()
        if not path.is_file():
            raise ChatError(f"chat template {chat_template!r}: not a built-in template ({', '.join(TEMPLATES)}), "
                            "not a file, and no Jinja in it")
        found = find_chat_template(path)
        if found is None:
            raise ChatError(f"{path}: no chat_template in it")
        return found
    return chat_template


def _read_json(path: pathlib.Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except ValueError as e:
        raise ChatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ChatError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------- Jinja


class _GenerationTracker(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body and, while `tracking` is active, records
    the body's [start, end) character span in the output. The start is the length of what the template
    has yielded so far, as transformers measures it."""

    tags = {"generation"}

    def __init__(self, environment):
        super().__init__(environment)
        self._spans = contextvars.ContextVar("generation_spans", default=None)
        environment.extend(tracking=self.tracking)

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(lineno)

    def _record(self, caller):
        text = caller()
        state = self._spans.get()
        if state is not None:
            yielded, spans = state
            start = sum(map(len, yielded))
            spans.append((start, start + len(text)))
        return text

    @contextlib.contextmanager
    def tracking(self, yielded: list[str], spans: list[tuple[int, int]]):
        token = self._spans.set((yielded, spans))
        try:
            yield
        finally:
            self._spans.reset(token)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson escapes <, >, & and ' for HTML; chat templates want the JSON itself.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.datetime.now().strftime(format)


class _DictMaker:
    """`dict(...)` and `dict.fromkeys(...)` in a template, without handing it the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace refusing attribute names that start with '_' (a way into Python internals)."""

    def __init__(*args, **kwargs):  # jinja2's own signature trick: namespace(self=...) stays possible
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace "
                                                  "(no names starting with '_')")


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """The chat template compiled in transformers' environment (see the module doc)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_DictMaker(),
                       namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatError(f"chat template: Jinja syntax error on line {e.lineno}: {e.message}") from None


def render(messages, chat_template: str, special_tokens: dict | None = None, add_generation_prompt: bool = False,
           **variables) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character spans of its {% generation %} blocks)."""
    template = compile_template(chat_template)
    messages = [_aliased_reasoning(m) for m in _plain_messages(messages)]
    yielded, spans = [], []
    try:
        with template.environment.tracking(yielded, spans):
            for piece in template.generate(messages=messages, tools=None, documents=None,
                                           add_generation_prompt=add_generation_prompt,
                                           **{**(special_tokens or {}), **variables}):
                yielded.append(piece)
    except jinja2.exceptions.TemplateError as e:
        raise ChatError(f"chat template: {e}") from None
    return "".join(yielded), spans


def _plain_messages(messages) -> list[dict]:
    """The messages as the template sees them: checked, keys with None values dropped (as transformers
    does), copied so that the caller's are never changed."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatError(f"a conversation is a non-empty list of {{role, content}} messages, found {messages!r:.200}")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatError(f"message {i}: expected a {{role, content}} object, found {message!r:.200}")
        role = message.get("role")
        if role not in KNOWN_ROLES:
            raise ChatError(f"message {i}: unknown role {role!r}; expected one of {', '.join(KNOWN_ROLES)}")
        plain.append({key: _plain(value) for key, value in message.items() if value is not None})
    return plain


def _plain(value):
    """JSON data as plain Python types (no subclasses with methods of their own inside the sandbox)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for kind in (bool, str, int, float):
        if isinstance(value, kind):
            return kind(value)
    return f"<{type(value).__name__}>"  # what transformers puts in place of an object that is not JSON


def _aliased_reasoning(message: dict) -> dict:
    """transformers' aliasing: a message's reasoning under an older name is also `reasoning_content` and
    `thinking` (key order as it makes it, since `tojson` shows it)."""
    reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


# --------------------------------------------------------------------------------------------- tokenizing


@functools.lru_cache(maxsize=8)
def _load(tokenizer_file: str, mtime_ns: int):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(tokenizer_file)
    except Exception as e:  # tokenizers raises its own exception types
        raise ChatError(f"{tokenizer_file}: not a Hugging Face tokenizer.json ({e})") from None


def tokenizer_files(tokenizer) -> tuple[pathlib.Path, pathlib.Path]:
    """(the tokenizer.json, its directory) of a tokenizer directory, a tokenizer.json, a DATA_DIR or an
    object with a `.path` (phi_jax.data.tokenizer.Tokenizer)."""
    path = pathlib.Path(getattr(tokenizer, "path", tokenizer)).expanduser()
    for candidate in (path, path / TOKENIZER_FILE, path / "prepared" / TOKENIZER_FILE):
        if candidate.is_file():
            return candidate, candidate.parent
    raise ChatError(f"{path}: no {TOKENIZER_FILE} there (give a tokenizer directory or a tokenizer.json)")


def special_tokens(directory) -> dict[str, str]:
    """{bos_token: "...", eos_token: ...} of a tokenizer directory, as transformers hands them to a
    template: from tokenizer_config.json, else special_tokens_map.json."""
    directory = pathlib.Path(directory)
    found = {}
    for name in (SPECIAL_TOKENS_FILE, CONFIG_FILE):  # the config's win
        if (directory / name).is_file():
            for key, value in _read_json(directory / name).items():
                if key in SPECIAL_TOKEN_NAMES and value is not None:
                    found[key] = value["content"] if isinstance(value, dict) else str(value)
    return found


def encode_chat(messages, tokenizer, chat_template=None, add_generation_prompt: bool = False
                ) -> tuple[list[int], list[int]]:
    """(token ids, assistant mask) of a conversation, equal to transformers' apply_chat_template (see the
    module doc). The mask is 1 on every token of an assistant turn's generation block (its end-of-turn
    token included), else 0.

    For training (add_generation_prompt False) the template must mark its assistant turns with
    {% generation %} and the conversation must have an assistant turn; a prompt
    (add_generation_prompt True) needs neither, and its mask marks the earlier assistant turns."""
    tokenizer_file, directory = tokenizer_files(tokenizer)
    source = resolve_template(chat_template, directory)
    messages = _plain_messages(messages)
    if not add_generation_prompt:
        if not GENERATION_TAG.search(source):
            raise ChatError(f"chat template {_name_of(chat_template, directory)} has no {{% generation %}} block "
                            "around the assistant's turns, so no loss mask can be made from it; use a template "
                            f"that marks them ({', '.join(TEMPLATES)} do)")
        if not any(m["role"] == "assistant" for m in messages):
            raise ChatError(f"conversation has no assistant turn to train on (roles: {[m['role'] for m in messages]})")
    text, spans = render(messages, source, special_tokens(directory), add_generation_prompt)
    encoding = _load(str(tokenizer_file), tokenizer_file.stat().st_mtime_ns).encode(text, add_special_tokens=False)
    return list(encoding.ids), overlap_mask(encoding.offsets, spans)


def overlap_mask(offsets, spans) -> list[int]:
    """1 for each token whose [start, end) characters overlap one of the (sorted) spans, else 0."""
    mask = [0] * len(offsets)
    span = 0
    for i, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if end > spans[span][0]:
            mask[i] = 1
    return mask


def _name_of(chat_template, directory) -> str:
    if chat_template is None:
        return f"of {directory}"
    text = str(chat_template)
    return repr(text) if len(text) < 80 else repr(text[:77] + "...")


# --------------------------------------------------------------------------------------------- records

# ShareGPT's `from` names (OpenHermes, Samantha, Vicuna) -> roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "tool": "tool", "function": "tool", "observation": "tool"}
RECORD_FORMATS = ("messages [{role, content}]", "conversations [{from, value}]", "instruction/input/output",
                  "prompt/completion")


def messages_of(record) -> list[dict]:
    """The conversation in a data record: `messages` ([{role, content}]), `conversations` (ShareGPT
    [{from, value}]), Alpaca (`instruction`, optional `input` and `system`, `output`) or
    `prompt`/`completion` (strings, or lists of messages). A ChatError says what is wrong."""
    if not isinstance(record, dict):
        raise ChatError(f"expected a JSON object, found {type(record).__name__}")
    if "messages" in record:
        return _message_list(record["messages"], "messages")
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise ChatError(f"conversations: expected a list of {{from, value}}, found {type(turns).__name__}")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise ChatError(f"conversations[{i}]: expected {{from, value}} with a string value, "
                                f"found {turn!r:.100}")
            role = SHAREGPT_ROLES.get(str(turn.get("from")).lower())
            if role is None:
                raise ChatError(f"conversations[{i}]: unknown speaker from={turn.get('from')!r}; expected one of "
                                f"{', '.join(SHAREGPT_ROLES)}")
            messages.append({"role": role, "content": turn["value"]})
        return messages
    if "instruction" in record and "output" in record:
        prompt = _string(record, "instruction")
        extra = _string(record, "input") if record.get("input") is not None else ""
        system = [{"role": "system", "content": _string(record, "system")}] if record.get("system") else []
        user = prompt + ("\n\n" + extra if extra.strip() else "")
        return system + [{"role": "user", "content": user}, {"role": "assistant", "content": _string(record, "output")}]
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        prompt = _message_list(prompt, "prompt") if isinstance(prompt, list) else \
            [{"role": "user", "content": _string(record, "prompt")}]
        completion = _message_list(completion, "completion") if isinstance(completion, list) else \
            [{"role": "assistant", "content": _string(record, "completion")}]
        return prompt + completion
    raise ChatError(f"no conversation in the record (keys {sorted(record)[:8]}); expected one of "
                    f"{'; '.join(RECORD_FORMATS)}")


def _message_list(value, field: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ChatError(f"{field}: expected a list of {{role, content}} objects, found {value!r:.100}")
    return value


def _string(record: dict, field: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        raise ChatError(f"{field}: expected a string, found {type(value).__name__}")
    return value


def truncate_at_turn(ids, mask, max_tokens: int) -> int | None:
    """How many tokens of a conversation to keep within `max_tokens`: all of them if they fit, else up to
    the end of the last assistant turn (mask run) that fits; None when not even the first one does."""
    if len(ids) <= max_tokens:
        return len(ids)
    ends = [i + 1 for i in range(min(len(mask), max_tokens)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    return ends[-1] if ends else None


# --------------------------------------------------------------------------------------------- template tokens


def template_tokens(chat_template: str) -> tuple[str, ...]:
    """The special tokens a built-in template needs in the vocabulary (none for a template's own source)."""
    return TEMPLATE_TOKENS.get(str(chat_template), ())


def add_tokens(tokenizer_file, tokens, out_file) -> dict[str, int]:
    """Writes `out_file`: the tokenizer.json with `tokens` added as special tokens where it lacks them
    (they take the next free ids: for phi's tokenizer 50295 and up, rows of the embedding phi never
    trained). Returns {token: id} of the added ones."""
    from tokenizers import AddedToken, Tokenizer

    from phi_jax.files import replacing

    tok = Tokenizer.from_file(str(tokenizer_file))
    missing = [t for t in tokens if tok.token_to_id(t) is None]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    with replacing(out_file) as tmp:
        tmp.write_text(tok.to_str())
    return {t: tok.token_to_id(t) for t in missing}
