"""Token ids -> text as they are generated: whole characters only, cut at the first stop string.

    text = IncrementalText(tokenizer, stop=["\\n\\n"])
    for new_ids in chunks_of_generated_ids:
        text.add(new_ids)
        if text.stopped: break
        delta = text.release()   # the text that is now final ("" while a character or a possible stop
                                 # string is still incomplete)
    rest = text.flush()          # what was held back, once generation ends

A byte-level BPE token may end inside a UTF-8 character: its text waits for the token that completes
it (decoding a run of tokens by itself is then the same as decoding the whole completion). Text that
could be the start of a stop string waits too, so a stream never shows a stop string's first half.
"""


class IncrementalText:
    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.text = ""        # everything decoded so far
        self.emitted = 0      # how much of it has been given out
        self.stopped = False  # a stop string was found: text ends before it
        self.used = 0         # once stopped: how many ids of the last add() the completion took (through
                              # the one that completed the stop string); the rest are not part of it
        self._pending = []    # ids whose text is not yet whole characters

    def add(self, token_ids):
        """Appends the text of `token_ids` (one decode for all of them)."""
        if self.stopped:
            return
        token_ids = list(token_ids)
        held = len(self._pending)
        self._pending.extend(token_ids)
        piece = self.tokenizer.decode(self._pending)
        if piece.endswith("\ufffd"):  # an incomplete character (or one the tokenizer cannot decode yet)
            return
        pending, self._pending = self._pending, []
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        cut = self._find_stop(self.text + piece, search_from)
        if cut >= 0:
            # The fewest of the new ids whose text completes the stop string (a decode each, once a request).
            def completes(k):
                return self._find_stop(self.text + self.tokenizer.decode(pending[:held + k]), search_from) >= 0
            self.used = next(k for k in range(1, len(token_ids) + 1) if completes(k))
            self.text, self.stopped = (self.text + piece)[:cut], True
        else:
            self.text += piece

    def _find_stop(self, text: str, start: int) -> int:
        return min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)

    def release(self) -> str:
        """The text that became final since the last release."""
        return self._release(len(self.text) - (0 if self.stopped else self._held_back()))

    def flush(self) -> str:
        """The rest of the text, once generation has ended."""
        if self._pending and not self.stopped:
            self.text += self.tokenizer.decode(self._pending)
            self._pending = []
        return self._release(len(self.text))

    def _held_back(self) -> int:
        """The length of the longest end of the text that begins a stop string."""
        for length in range(min(len(self.text), max((len(s) for s in self.stop), default=0)), 0, -1):
            tail = self.text[-length:]
            if any(s.startswith(tail) and s != tail for s in self.stop):
                return length
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta, self.emitted = self.text[self.emitted:upto], upto
        return delta
