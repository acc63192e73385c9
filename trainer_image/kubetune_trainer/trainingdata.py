"""This rank's training and validation data: fetched, read, tokenized once per node, packed if asked.

Local rank 0 downloads and tokenizes, caches the result in the node's work
dir and releases the others, which load the cache.  A rank that finds no
cache (rank 0 failed on bad data) tokenizes itself and raises the same named
error.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer import data as data_mod
from kubetune_trainer.errors import InvalidData, InvalidSpec, StorageUnavailable
from kubetune_trainer.packing import pack
from kubetune_trainer.session import Session
from kubetune_trainer.spec import FineTuneJobSpec


@dataclass
class TrainingData:
    """Tokenized examples; ``items`` are what the sampler draws (examples, or packed rows of examples)."""

    train: list[data_mod.Example]
    validation: list[data_mod.Example]
    items: Sequence[Any]
    item_lengths: list[int]


def _fetch(uri: str, spec: FineTuneJobSpec, work_dir: Path, session: Session) -> Path:
    """A local path for a dataset URI (s3:// is downloaded once per node)."""
    from kubetune_trainer.sources import cache_dir_for, local_path

    path = local_path(uri)
    if path is not None:
        return path
    if uri.startswith("hf://"):
        raise InvalidSpec(f"dataset {uri}: hf:// datasets are not supported by this trainer build; use a file")
    target = cache_dir_for(uri, work_dir) / uri.rsplit("/", 1)[-1]

    def download() -> None:
        from kubetune_trainer import storage

        parent, _, name = uri.rpartition("/")
        try:
            store = storage.open_store(parent, endpoint=spec.checkpoint.endpoint, region=spec.checkpoint.region)
            if not store.exists(name):
                raise InvalidData(f"{uri}: file not found")
            store.get_file(name, target)
        except storage.StorageUnavailable as exc:
            raise StorageUnavailable(f"{uri}: object storage unavailable ({exc})") from exc

    session.local_rank_zero_first(download)
    return target


def _records(spec: FineTuneJobSpec, work_dir: Path, session: Session) -> tuple[list[Any], list[Any], str]:
    ds = spec.dataset

    def read(uri: str) -> list[data_mod.Record]:
        path = _fetch(uri, spec, work_dir, session)
        fmt = data_mod.infer_format(uri, ds.format.value if ds.format else None)
        return data_mod.read_records(path, fmt=fmt, display=uri)

    train_records = read(ds.train)
    if ds.max_train_samples:
        train_records = train_records[: ds.max_train_samples]
    if ds.validation:
        val_records, val_display = read(ds.validation), ds.validation
    elif ds.validation_split:
        if not train_records:
            raise InvalidData(f"{ds.train}: no examples (empty dataset)")
        train_records, val_records = data_mod.split_validation(train_records, ds.validation_split, spec.training.seed)
        val_display = ds.train
    else:
        val_records, val_display = [], ""
    if ds.max_eval_samples:
        val_records = val_records[: ds.max_eval_samples]
    return train_records, val_records, val_display


def load_training_data(spec: FineTuneJobSpec, tokenizer: Any, work_dir: Path, session: Session) -> TrainingData:
    """Read, validate and tokenize the job's data (every error names the file, line and field)."""
    ds = spec.dataset
    train_records, val_records, val_display = _records(spec, work_dir, session)

    def encode() -> tuple[list[data_mod.Example], list[data_mod.Example]]:
        train = data_mod.encode_records(
            train_records, tokenizer=tokenizer, model=spec.model, dataset=ds, display=ds.train
        )
        val = (
            data_mod.encode_records(val_records, tokenizer=tokenizer, model=spec.model, dataset=ds, display=val_display)
            if val_display
            else []
        )
        return train, val

    digest = hashlib.sha256(repr((spec.model.to_wire(), ds.to_wire(), spec.training.seed)).encode())
    for records in (train_records, val_records):
        for number, row in records:
            digest.update(repr((number, row)).encode())
    cache = work_dir / "tokenized" / f"{digest.hexdigest()[:20]}.pkl"

    def encode_and_cache() -> tuple[list[data_mod.Example], list[data_mod.Example]]:
        encoded = encode()
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(pickle.dumps(encoded))
        tmp.replace(cache)
        return encoded

    encoded = session.local_rank_zero_first(encode_and_cache)
    if encoded is None:  # another local rank: rank 0 wrote the cache moments ago, unless it failed
        encoded = pickle.loads(cache.read_bytes()) if cache.exists() else encode()  # noqa: S301
    train, validation = encoded
    return arrange(train, validation, packing=ds.packing, max_length=ds.max_length)


def arrange(
    train: list[data_mod.Example], validation: list[data_mod.Example], *, packing: bool, max_length: int
) -> TrainingData:
    """The sampler's items: the examples, or packed rows of them."""
    lengths = [len(e.input_ids) for e in train]
    if not packing:
        return TrainingData(train, validation, train, lengths)
    rows = pack(lengths, max_length)
    items = [[train[i] for i in row] for row in rows]
    return TrainingData(train, validation, items, [sum(lengths[i] for i in row) for row in rows])
