"""What the GGUF export asks the ``tokenizers`` library about a byte-level BPE tokenizer, worked
out in a second process while the converter goes on.

The facts are the ones llama.cpp's converter takes from the library: the vocabulary with the
added tokens, the ids of its check string (whose hash names the pre-tokenizer), the ids of a
probe (is a BOS/EOS added), and how each added token that is not normalized reads back after
an encode/decode round trip.

Why a process: building the tokenizer (``Tokenizer.from_file``, its merges table) and listing its
vocabulary hold the GIL for about a fifth of a second on a 50k vocabulary, a fifth of a small
model's whole F16 conversion; on a thread that would stall the converter's own Python work. A
fresh interpreter started before the converter imports gguf does it on another core.

The child only saves time: when it cannot give an answer (it failed, was killed, the library
raised), :meth:`Pending.facts` works the facts out in this process, where the library's own
error reaches the user as before.

This file runs standalone (``python -I -S tokenizer_facts.py SYS_PATH TOKENIZER_JSON``) and
imports nothing of llmops, so the child starts in a few hundredths of a second. That is why it
does not use the child-process protocol of ``llmops.core.child``: that protocol's child imports
llmops and answers through JSON files in a work folder, a tenth of a second this child exists to
save; and a failure here needs no one-line report of its own, since the work is redone in process.
"""

from __future__ import annotations

import marshal
import os
import subprocess
import sys
from hashlib import sha256
from typing import Any

# The check string llama.cpp's converter tokenizes to identify a BPE pre-tokenizer.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)


def check_hash(tok: Any) -> str:
    """llama.cpp's converter's identifier of a BPE tokenizer: sha256 of the check string's ids."""
    return sha256(str(tok.encode(CHECK_TEXT).ids).encode()).hexdigest()


def facts_of(tok: Any) -> dict[str, Any]:
    """The facts of a ``tokenizers.Tokenizer``, as plain lists, strings and numbers.

    ``tokens``/``ids``: ``get_vocab(with_added_tokens=True)`` in its own order (where two strings
    share an id, the later one is the id's token, as when a list is filled from the dict);
    ``added``: ``(id, normalized, special, round_trip)`` per added token, ``round_trip`` being the
    id's token after encode/decode when the added token is not normalized, else None."""
    vocab = tok.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    added = []
    for i, at in sorted(tok.get_added_tokens_decoder().items()):
        trip = None
        if not at.normalized and i in by_id:
            trip = tok.decode(tok.encode(by_id[i], add_special_tokens=False).ids, skip_special_tokens=False)
        added.append((i, bool(at.normalized), bool(at.special), trip))
    return {"tokens": list(vocab), "ids": list(vocab.values()), "chkhsh": check_hash(tok),
            "probe": tok.encode("a", add_special_tokens=True).ids, "added": added}


def facts_in_process(path: str) -> dict[str, Any]:
    from tokenizers import Tokenizer

    return facts_of(Tokenizer.from_file(path))


class Pending:
    """The facts of one tokenizer.json, being worked out by a child process.

    Always :meth:`close` it (the converter does, on every exit path): a child whose facts were
    not needed (a SentencePiece model, a refused checkpoint) is killed there."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._proc: subprocess.Popen[bytes] | None = None
        self._facts: dict[str, Any] | None = None
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), os.pathsep.join(sys.path), path],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except OSError:  # no process to spare: the facts are worked out here when asked for
            self._proc = None

    def facts(self) -> dict[str, Any]:
        """The child's answer; if it has none, the facts worked out in this process."""
        if self._facts is None:
            got = self._collect()
            self._facts = got if got is not None else facts_in_process(self.path)
        return self._facts

    def _collect(self) -> dict[str, Any] | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        try:
            assert proc.stdout is not None
            data = proc.stdout.read()
            if proc.wait() != 0:
                return None
            got = marshal.loads(data)
        except (OSError, ValueError, EOFError, TypeError):
            return None
        finally:
            _end(proc)
        return got if isinstance(got, dict) and {"tokens", "ids", "chkhsh", "probe", "added"} <= set(got) else None

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _end(proc)


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    if proc.stdout is not None:
        proc.stdout.close()
    proc.wait()


def start(path: str) -> Pending | None:
    """Start working out the facts of ``path`` (a tokenizer.json) if there is one (and an
    interpreter to run the child: an embedding application may have none)."""
    return Pending(path) if sys.executable and os.path.isfile(path) else None


if __name__ == "__main__":
    sys.path[:] = sys.argv[1].split(os.pathsep)
    sys.stdout.buffer.write(marshal.dumps(facts_in_process(sys.argv[2])))
