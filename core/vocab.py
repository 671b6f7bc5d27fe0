"""Persisted, append-only vocabularies mapping domain values to stable integer ids.

Conversion types and display scenarios get ids in order of first appearance; a new value
gets the next id and an existing id never changes, so models trained on older days stay
valid. Stored as JSON under ``<lake_root>/vocab/<name>.json`` and written atomically.

Growth is staged: a day's build writes the committed vocabulary plus that day's new values
to ``<vocab_dir>/staged/dt=D/<name>.json`` (its samples' ids come from it) and only
:func:`commit_staged_vocab`, called when the day passes validation, appends them to the
committed files that training and serving read (:func:`load_vocab`). One junk day can then
never push the vocabulary past the model's capacity for every later training.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


class VocabularyError(ValueError):
    """A value is not in the vocabulary, or a vocabulary file is corrupt."""


class Vocabulary:
    def __init__(self, name: str, ids: dict[str, int] | None = None) -> None:
        self.name = name
        self.ids: dict[str, int] = dict(ids or {})
        if sorted(self.ids.values()) != list(range(len(self.ids))):
            raise VocabularyError(f"vocabulary {name!r}: ids must be 0..n-1 without gaps")

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, value: object) -> bool:
        return value in self.ids

    def id_of(self, value: str) -> int:
        try:
            return self.ids[value]
        except KeyError:
            raise VocabularyError(f"unknown {self.name} {value!r}") from None

    def values(self) -> list[str]:
        """Values ordered by id."""
        return sorted(self.ids, key=self.ids.__getitem__)

    def extend(self, values: Iterable[str]) -> list[str]:
        """Append unseen values (sorted, for determinism) and return them."""
        new = sorted({v for v in values if v not in self.ids})
        for value in new:
            self.ids[value] = len(self.ids)
        return new

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "values": self.values()}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Vocabulary:
        values = list(data["values"])  # type: ignore[arg-type]
        return cls(str(data["name"]), {v: i for i, v in enumerate(values)})


def vocab_path(vocab_dir: Path, name: str) -> Path:
    return vocab_dir / f"{name}.json"


def load_vocab(vocab_dir: Path, name: str) -> Vocabulary:
    path = vocab_path(vocab_dir, name)
    if not path.exists():
        return Vocabulary(name)
    try:
        return Vocabulary.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise VocabularyError(f"vocabulary file {path} is corrupt: {exc}") from exc


def save_vocab(vocab_dir: Path, vocab: Vocabulary) -> Path:
    vocab_dir.mkdir(parents=True, exist_ok=True)
    path = vocab_path(vocab_dir, vocab.name)
    fd, tmp = tempfile.mkstemp(dir=vocab_dir, prefix=f".{vocab.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(vocab.to_json(), fh, indent=1)
    os.replace(tmp, path)
    return path


def staged_vocab_dir(vocab_dir: Path, day: str) -> Path:
    """Where a day's build stages its proposed vocabularies."""
    return vocab_dir / "staged" / f"dt={day}"


def stage_vocab(vocab_dir: Path, day: str, vocab: Vocabulary) -> Path:
    """Write ``vocab`` (committed values first, then the day's new ones) as ``day``'s proposal."""
    return save_vocab(staged_vocab_dir(vocab_dir, day), vocab)


def load_day_vocab(vocab_dir: Path, day: str, name: str) -> Vocabulary:
    """The vocabulary a day's samples were encoded with: its staged one, else the committed
    one (days built before staging, or hand-written partitions)."""
    staged = staged_vocab_dir(vocab_dir, day)
    return load_vocab(staged if vocab_path(staged, name).exists() else vocab_dir, name)


def staged_conflict(committed: Vocabulary, staged: Vocabulary) -> str | None:
    """Why ``staged`` cannot be committed over ``committed``, or None.

    One of the two must extend the other: a day built on an older vocabulary than another
    day committed since may have given a different value the same id, and must be rebuilt."""
    mine, theirs = staged.values(), committed.values()
    n = min(len(mine), len(theirs))
    if mine[:n] == theirs[:n]:
        return None
    diverged = next(i for i in range(n) if mine[i] != theirs[i])
    return (f"{staged.name}: id {diverged} is {mine[diverged]!r} in the day's staged vocabulary but "
            f"{theirs[diverged]!r} in the committed one (another day was committed after this one was "
            "built): rebuild the day")


def new_values(vocab_dir: Path, day: str, name: str) -> list[str]:
    """Values the day's staged vocabulary adds to the committed one."""
    committed = load_vocab(vocab_dir, name)
    return [v for v in load_day_vocab(vocab_dir, day, name).values() if v not in committed]


@contextmanager
def _commit_lock(vocab_dir: Path) -> Iterator[None]:
    vocab_dir.mkdir(parents=True, exist_ok=True)
    with open(vocab_dir / ".commit.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def commit_staged_vocab(vocab_dir: Path, day: str) -> dict[str, list[str]]:
    """Append the day's staged values to the committed vocabularies; returns them per name.

    Call only after the day passed validation. A no-op for a day without a staged vocabulary
    or without new values; raises VocabularyError (nothing written) when a staged vocabulary
    conflicts with the committed one. Serialized by a lock beside the vocabularies."""
    staged_dir = staged_vocab_dir(vocab_dir, day)
    if not staged_dir.is_dir():
        return {}
    with _commit_lock(vocab_dir):
        pending: list[Vocabulary] = []
        added: dict[str, list[str]] = {}
        for path in sorted(staged_dir.glob("*.json")):
            staged = load_vocab(staged_dir, path.stem)
            committed = load_vocab(vocab_dir, staged.name)
            problem = staged_conflict(committed, staged)
            if problem:
                raise VocabularyError(f"cannot commit the vocabulary of dt={day}: {problem}")
            if len(staged) > len(committed):
                pending.append(staged)
                added[staged.name] = staged.values()[len(committed):]
        for vocab in pending:
            save_vocab(vocab_dir, vocab)
    return added
