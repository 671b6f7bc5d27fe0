"""Stream the samples Parquet of a window of days into shuffled mini-batches.

Memory is bounded whatever the window: files are read in record batches of
``cfg.training.read_batch_rows`` rows and mixed through a shuffle buffer of at most
``cfg.training.shuffle_buffer`` rows (plus the record batch being merged in); each of the
``interleave`` open readers also holds at most one Parquet row group. Because the samples
are sorted by domain, several files / row groups are read round-robin so the buffer sees
rows of many domains at once.

Streams are deterministic given (seed, epoch, rank, world_size): the trainer resumes after
a crash by replaying the stream and skipping the batches it had already consumed. Under DDP
every rank reads and shuffles the same stream and keeps its slice of each global batch
(see ``SampleStream.iter_chunks``).

Rows can be split deterministically by a hash of impression_id
(``signed_xxhash64(impression_id) mod 10000``): bucket < fraction * 10000 is the holdout.
The same rule carves the trainer's validation slice out of the remaining buckets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from core.config import PipelineConfig
from core.contracts import DOMAIN_COLUMNS, ID_COLUMN, LABEL_COLUMNS, SPLITS
from core.hashing import signed_xxhash64

HASH_BUCKETS = 10_000


@dataclass(frozen=True)
class BucketRange:
    """Rows whose hash bucket lies in [lo, hi) are kept (keep=True) or dropped (keep=False)."""

    lo: int
    hi: int
    keep: bool

    def mask(self, buckets: np.ndarray) -> np.ndarray:
        inside = (buckets >= self.lo) & (buckets < self.hi)
        return inside if self.keep else ~inside


def fraction_to_buckets(fraction: float) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    return int(round(fraction * HASH_BUCKETS))


def hash_buckets(impression_ids: Sequence[str] | np.ndarray, seed: int = 42) -> np.ndarray:
    """Bucket in [0, 10000) of each impression id (Spark: pmod(xxhash64(id), 10000))."""
    hashes = np.fromiter((signed_xxhash64(str(i), seed) for i in impression_ids),
                         dtype=np.int64, count=len(impression_ids))
    return np.mod(hashes, HASH_BUCKETS)


def split_ranges(split: str | None, holdout_fraction: float | None) -> tuple[BucketRange, ...]:
    """Bucket ranges for split="holdout" (bucket < fraction) / "train" (the rest) / None."""
    if split is None:
        return ()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if holdout_fraction is None:
        raise ValueError(f"split={split!r} needs a holdout_fraction")
    hi = fraction_to_buckets(holdout_fraction)
    return (BucketRange(0, hi, keep=split == "holdout"),)


def day_files(cfg: PipelineConfig, day: str) -> list[Path]:
    """The day's Parquet part files, sorted; FileNotFoundError naming the day if none."""
    directory = cfg.paths.samples_dir(day)
    if not directory.is_dir():
        raise FileNotFoundError(f"no samples for day {day}: directory {directory} does not exist")
    files = sorted(p for p in directory.glob("*.parquet") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no samples for day {day}: {directory} holds no *.parquet files")
    return files


@dataclass(frozen=True)
class ReadUnit:
    """One file, or some of its row groups, read sequentially by one reader."""

    path: Path
    row_groups: tuple[int, ...] | None = None


def _row_group_units(path: Path) -> list[ReadUnit]:
    return [ReadUnit(path, (g,)) for g in range(pq.ParquetFile(path).metadata.num_row_groups)]


def count_rows(cfg: PipelineConfig, days: Sequence[str]) -> int:
    """Total rows of the days from Parquet metadata (no data read)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for d in days for p in day_files(cfg, d))


@dataclass
class Chunk:
    """Rows in columnar numpy form: ``ints`` holds features, domain ids and labels."""

    ints: np.ndarray  # int32 [n, F + 4]: feat_*, type_id, scenario_id, click, conversion
    ids: np.ndarray | None  # object [n] impression ids, when requested

    def __len__(self) -> int:
        return self.ints.shape[0]

    def take(self, idx: np.ndarray) -> Chunk:
        return Chunk(self.ints[idx], None if self.ids is None else self.ids[idx])

    @staticmethod
    def concat(chunks: Sequence[Chunk]) -> Chunk:
        ints = np.concatenate([c.ints for c in chunks])
        ids = None if chunks[0].ids is None else np.concatenate([c.ids for c in chunks])
        return Chunk(ints, ids)


class SampleStream:
    """Iterable of mini-batches (dicts of tensors) over the samples of ``days``."""

    def __init__(
        self,
        cfg: PipelineConfig,
        days: Sequence[str],
        *,
        batch_size: int | None = None,
        shuffle: bool = True,
        seed: int | None = None,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        split: str | None = None,
        holdout_fraction: float | None = None,
        ranges: Sequence[BucketRange] = (),
        with_impression_id: bool = False,
        drop_last: bool = False,
        skip_batches: int = 0,
        interleave: int = 4,
    ) -> None:
        if not days:
            raise ValueError("no days to read")
        self.cfg = cfg
        self.days = list(days)
        self.batch_size = int(batch_size or cfg.training.batch_size)
        self.shuffle = shuffle
        self.seed = cfg.training.seed if seed is None else int(seed)
        self.epoch, self.rank, self.world_size = int(epoch), int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.ranges = (*split_ranges(split, holdout_fraction), *ranges)
        self.with_impression_id = with_impression_id
        self.drop_last = drop_last
        self.skip_batches = int(skip_batches)
        self.interleave = max(1, int(interleave))
        self.buffer_rows = max(0, int(cfg.training.shuffle_buffer)) if shuffle else 0
        self.read_rows = max(1, int(cfg.training.read_batch_rows))
        self.feature_columns = cfg.feature_columns
        self.files = [p for d in self.days for p in day_files(cfg, d)]
        self.max_buffered_rows = 0  # peak rows held in the shuffle buffer (for monitoring)

    @property
    def columns(self) -> list[str]:
        cols = [*self.feature_columns, *DOMAIN_COLUMNS, *LABEL_COLUMNS]
        if self.with_impression_id or self.ranges:
            cols.append(ID_COLUMN)
        return cols

    def _rng(self, salt: int) -> np.random.Generator:
        # Rank-independent: every rank shuffles the same stream the same way (iter_chunks).
        return np.random.default_rng([self.seed, self.epoch, 0, salt])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | list[str]]]:
        for i, chunk in enumerate(self.iter_chunks()):
            if i >= self.skip_batches:
                yield to_tensors(chunk, len(self.feature_columns))

    def iter_chunks(self) -> Iterator[Chunk]:
        """This rank's mini-batches in numpy form (cheap to skip when resuming).

        Every rank reads and shuffles the same stream and cuts it into the same global
        batches of ``batch_size * world_size`` rows; rank r keeps rows r, r + world_size, ...
        of each, so a step's per-rank batches partition exactly the batch one process would
        train on with ``batch_size * world_size`` (each rank decodes every row for that).
        Ranks must not own files or row groups: the samples are sorted by domain, so such
        shards are domain-biased (two part files a day gave rank 0 type 0 only), and DDP,
        averaging per-rank losses with batch-local N / N_c weights, then trains another
        objective than one process (holdout CVR AUC 0.72 vs 0.79 on synthetic data).
        """
        for batch in self._global_batches(self.batch_size * self.world_size):
            if self.world_size > 1:
                batch = batch.take(np.arange(self.rank, len(batch), self.world_size))
            if len(batch):  # a last global batch of fewer rows than ranks leaves some empty
                yield batch

    def _global_batches(self, size: int) -> Iterator[Chunk]:
        pending: list[Chunk] = []
        n_pending = 0
        for chunk in self._shuffled(self._filtered(self._read())):
            pending.append(chunk)
            n_pending += len(chunk)
            if n_pending < size:
                continue
            merged = Chunk.concat(pending)
            full = (len(merged) // size) * size
            for start in range(0, full, size):
                yield merged.take(np.arange(start, start + size))
            rest = merged.take(np.arange(full, len(merged)))
            pending, n_pending = ([rest], len(rest)) if len(rest) else ([], 0)
        if n_pending and not self.drop_last:
            yield Chunk.concat(pending)

    def _units(self) -> list[ReadUnit]:
        # Single row groups, so that shuffling their order mixes domains even within a
        # file (the samples are sorted by domain) whenever the writer used several.
        units = [u for p in self.files for u in _row_group_units(p)]
        if self.shuffle:
            order = self._rng(1).permutation(len(units))
            units = [units[i] for i in order]
        return units

    def _read(self) -> Iterator[Chunk]:
        """Record batches, round-robin over up to ``interleave`` open units."""
        queue = self._units()
        active: list[Iterator[pa.RecordBatch]] = []
        while queue or active:
            while queue and len(active) < self.interleave:
                active.append(self._open(queue.pop(0)))
            for reader in list(active):
                batch = next(reader, None)
                if batch is None:
                    active.remove(reader)
                    continue
                yield self._to_chunk(batch)

    def _open(self, unit: ReadUnit) -> Iterator[pa.RecordBatch]:
        pf = pq.ParquetFile(unit.path)
        missing = [c for c in self.columns if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(f"{unit.path}: samples file lacks columns {missing}")
        return pf.iter_batches(batch_size=self.read_rows, row_groups=unit.row_groups,
                               columns=self.columns)

    def _to_chunk(self, batch: pa.RecordBatch) -> Chunk:
        names = [*self.feature_columns, *DOMAIN_COLUMNS, *LABEL_COLUMNS]
        ints = np.empty((batch.num_rows, len(names)), dtype=np.int32)
        for j, name in enumerate(names):
            col = batch.column(name)
            if col.null_count:
                raise ValueError(f"column {name!r} holds nulls; the samples contract forbids them")
            ints[:, j] = col.to_numpy(zero_copy_only=False)
        ids = None
        if ID_COLUMN in batch.schema.names:
            ids = batch.column(ID_COLUMN).to_numpy(zero_copy_only=False)
        return Chunk(ints, ids)

    def _filtered(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        for chunk in chunks:
            if self.ranges:
                buckets = hash_buckets(chunk.ids, self.cfg.hashing.seed)
                keep = np.ones(len(chunk), dtype=bool)
                for r in self.ranges:
                    keep &= r.mask(buckets)
                chunk = chunk.take(np.nonzero(keep)[0])
            if not self.with_impression_id:
                chunk = Chunk(chunk.ints, None)
            if len(chunk):
                yield chunk

    def _shuffled(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        """Bounded shuffle buffer: rows beyond capacity leave it in random order."""
        if not self.shuffle:
            yield from chunks
            return
        rng = self._rng(2)
        buffer: Chunk | None = None
        for chunk in chunks:
            buffer = chunk if buffer is None else Chunk.concat([buffer, chunk])
            self.max_buffered_rows = max(self.max_buffered_rows, len(buffer))
            excess = len(buffer) - self.buffer_rows
            if excess > 0:
                order = rng.permutation(len(buffer))
                yield buffer.take(order[:excess])
                buffer = buffer.take(order[excess:])
        if buffer is not None and len(buffer):
            yield buffer.take(rng.permutation(len(buffer)))


def to_tensors(chunk: Chunk, n_features: int) -> dict[str, torch.Tensor | list[str]]:
    """Model-ready batch: features [B, F] long, type/scenario long, click/conversion float."""
    ints = chunk.ints
    batch: dict[str, torch.Tensor | list[str]] = {
        "features": torch.from_numpy(ints[:, :n_features].astype(np.int64)),
        "type_id": torch.from_numpy(ints[:, n_features].astype(np.int64)),
        "scenario_id": torch.from_numpy(ints[:, n_features + 1].astype(np.int64)),
        "click": torch.from_numpy(ints[:, n_features + 2].astype(np.float32)),
        "conversion": torch.from_numpy(ints[:, n_features + 3].astype(np.float32)),
    }
    if chunk.ids is not None:
        batch["impression_id"] = [str(i) for i in chunk.ids]
    return batch


def iter_batches(cfg: PipelineConfig, days: Sequence[str], **kwargs: object) -> SampleStream:
    """Shorthand for :class:`SampleStream` (same keyword arguments)."""
    return SampleStream(cfg, days, **kwargs)  # type: ignore[arg-type]


def batch_to_device(batch: dict[str, torch.Tensor | list[str]], device: torch.device,
                    ) -> dict[str, torch.Tensor | list[str]]:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
