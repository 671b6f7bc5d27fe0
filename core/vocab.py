"""Persisted, append-only vocabularies mapping domain values to stable integer ids.

Conversion types and display scenarios get ids in order of first appearance; a new value
gets the next id and an existing id never changes, so models trained on older days stay
valid. Stored as JSON under ``<lake_root>/vocab/<name>.json`` and written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
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
