"""One generated row's text as tokens arrive: UTF-8-safe deltas, stop strings, which tokens were shown.

`decode.stream_batch` keeps one per row, and so does the server's running batch: a row ends at its
first stop string (excluded); text that may still become a stop string, or an incomplete UTF-8
sequence, is held back until it cannot. It also tells which tokens a delta covers, so per-token
log-probabilities travel with the text they produced (a token is reported once all of its text
is out, or, when the row ends, if any of its text was kept).
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # text that may yet become a stop string
        self.ids: list[int] = []
        self.ends: list[int] = []  # decoded length of the text after each token
        self.emitted = ""
        self.stopped = False  # a stop string was reached: the row is finished
        self.reported = 0  # tokens handed out by `covered`

    def push(self, token: int) -> str:
        """Add one token; the new text that is safe to show ("" if none)."""
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        self.ends.append(len(text))
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
            safe = len(text)
        else:  # an incomplete UTF-8 sequence decodes to U+FFFD: wait for the rest
            safe = len(text.rstrip("\ufffd")) - self.hold
        return self._emit(text, safe)

    def flush(self) -> str:
        """The text held back, at the end of a row that did not stop on a stop string."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        return self._emit(text, len(text))

    def _emit(self, text: str, safe: int) -> str:
        if safe <= len(self.emitted):
            return ""
        new = text[len(self.emitted):safe]
        self.emitted = text[:safe]
        return new

    def covered(self, final: bool = False) -> list[int]:
        """Indices of the tokens whose text is now out (all that contributed, when ``final``)."""
        out = []
        shown = len(self.emitted)
        while self.reported < len(self.ids):
            j = self.reported
            start = self.ends[j - 1] if j else 0
            if not (self.ends[j] <= shown or (final and start < shown)):
                break
            out.append(j)
            self.reported += 1
        return out
