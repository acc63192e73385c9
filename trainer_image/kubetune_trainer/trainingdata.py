"""This rank's training and validation data: looked up, tokenized once per job, memory-mapped.

1. Global rank 0 looks the sources up (:mod:`~kubetune_trainer.datasources`) and keys the
   token store by the data's identity, the tokenizer and the dataset spec; every rank gets
   the plan (or rank 0's error, raised everywhere alike).
2. The store is taken from this node, from the job's storage, or built once
   (:mod:`~kubetune_trainer.datacache`, :mod:`~kubetune_trainer.tokenizing`).
3. Every rank maps it (:mod:`~kubetune_trainer.tokenstore`): ``items`` build examples
   lazily, so a rank's memory for data does not grow with the dataset.

Examples left without a trainable token by truncation are dropped at tokenization and
counted; more than ``dataset.maxDroppedFraction`` of a source fails the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kubetune_trainer import chat, datacache, datasources, encoding, readers
from kubetune_trainer.cpus import available_cpus
from kubetune_trainer.data import Example
from kubetune_trainer.errors import InvalidData, TrainerError
from kubetune_trainer.packing import pack
from kubetune_trainer.session import Session
from kubetune_trainer.spec import FineTuneJobSpec
from kubetune_trainer.tokenizing import Progress, RoleCounts, tokenize_into
from kubetune_trainer.tokenstore import FORMAT_VERSION, StoreWriter, TokenStore

ROLE_NAMES = {"train": "training", "validation": "validation"}


@dataclass
class DataReport:
    """What the data gave: per source rows, examples, tokens and drops; the mode; the cache used."""

    mode: str
    parts: dict[str, dict[str, Any]]
    cache: dict[str, Any] = field(default_factory=dict)

    def dropped(self) -> dict[str, int]:
        """Examples dropped by reason, over all sources."""
        total: dict[str, int] = dict.fromkeys(encoding.STATUS_REASONS.values(), 0)
        for counts in self.parts.values():
            for reason, n in counts.get("dropped", {}).items():
                total[reason] = total.get(reason, 0) + int(n)
        return total

    def to_json(self) -> dict[str, Any]:
        """The report as JSON (``kubetune-metrics.json``, the termination message)."""
        examples = {role: int(counts["examples"]) for role, counts in self.parts.items()}
        return {"mode": self.mode, "examples": examples, "dropped": self.dropped(), "cache": dict(self.cache)}


@dataclass
class TrainingData:
    """Tokenized examples; ``items`` are what the sampler draws (examples, or packed rows of examples)."""

    train: Sequence[Example]
    validation: Sequence[Example]
    items: Sequence[Any]
    item_lengths: Sequence[int] | np.ndarray  # numpy when read from the token store
    report: DataReport | None = None


# --------------------------------------------------------------------------- step 1: plan and key


@dataclass(frozen=True)
class _Plan:
    sources: dict[str, datasources.SourcePlan]
    key: str
    nonce: str


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about the tokenizer that changes the ids it produces."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Truncation and padding are set on the backend by each call (the calls pass them explicitly).
        state.pop("truncation", None)
        state.pop("padding", None)
        body = json.dumps(state, sort_keys=True)
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in dict(tokenizer.special_tokens_map).items()},
        "template": getattr(tokenizer, "chat_template", None),
        "sides": [getattr(tokenizer, "padding_side", None), getattr(tokenizer, "truncation_side", None)],
    }
    digest = hashlib.sha256(body.encode())
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(spec: FineTuneJobSpec, tokenizer: Any, sources: dict[str, datasources.SourcePlan]) -> str:
    """The token store's key: the data's identity, the tokenizer and what the spec says about the data."""
    dataset = spec.dataset.to_wire()
    dataset.pop("maxDroppedFraction", None)  # applied when the store is read, not when it is built
    body = {
        "format": FORMAT_VERSION,
        "sources": {role: plan.identity for role, plan in sorted(sources.items())},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dataset": dataset,
        "task": spec.model.task.value,
        "labels": encoding.label_names(spec.model),
        "seed": spec.training.seed if spec.dataset.validation_split else None,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _plan_sources(spec: FineTuneJobSpec, tokenizer: Any) -> _Plan:
    ds, ckpt = spec.dataset, spec.checkpoint
    fmt = ds.format.value if ds.format else None
    sources = {
        "train": datasources.plan(
            ds.train, declared_format=fmt, split=ds.split, subset=ds.subset, endpoint=ckpt.endpoint, region=ckpt.region
        )
    }
    if ds.validation:
        sources["validation"] = datasources.plan(
            ds.validation,
            declared_format=fmt,
            split=ds.validation_split_name,
            subset=ds.subset,
            endpoint=ckpt.endpoint,
            region=ckpt.region,
        )
    import uuid

    return _Plan(sources, cache_key(spec, tokenizer, sources), uuid.uuid4().hex[:12])


def _shared_plan(spec: FineTuneJobSpec, tokenizer: Any, session: Session) -> _Plan:
    """Rank 0's plan on every rank; rank 0's error raised on every rank."""
    mine: tuple[str, Any] = ("none", None)
    if session.rank == 0:
        try:
            mine = ("plan", _plan_sources(spec, tokenizer))
        except TrainerError as error:
            mine = ("error", (type(error), error.message))
    kind, value = session.all_gather_object(mine)[0]
    if kind == "error":
        error_class, message = value
        raise error_class(message)
    assert isinstance(value, _Plan)
    return value


# --------------------------------------------------------------------------- step 2: the store


def _progress_reporter(place: datacache.CachePlace, session: Session) -> Any:
    marks = {"file": 0.0, "remote": 0.0, "log": time.monotonic()}

    def report(progress: Progress) -> None:
        now = time.monotonic()
        line = (
            f"tokenizing {progress.role}: chunk {progress.chunks_done}/{progress.chunks_total}, "
            f"{progress.rows:,} rows, {progress.seconds:.0f} s"
        )
        if now - marks["file"] >= 2.0:
            marks["file"] = now
            remote = now - marks["remote"] >= datacache.PROGRESS_EVERY_SECONDS
            if remote:
                marks["remote"] = now
            datacache.publish_progress(place, line, remote=remote)
        if now - marks["log"] >= datacache.PROGRESS_EVERY_SECONDS:
            marks["log"] = now
            session.log(line)

    return report


def _build(
    place: datacache.CachePlace, spec: FineTuneJobSpec, tokenizer: Any, plan: _Plan, work_dir: Path, session: Session
) -> dict[str, RoleCounts]:
    """Tokenize the sources into ``place.local`` (through a staging folder renamed when whole)."""
    ds, ckpt = spec.dataset, spec.checkpoint
    defaults = {"train": ds.split or "train", "validation": ds.validation_split_name or "validation"}
    chunks = {
        role: datasources.materialize(
            source, work_dir=work_dir, default_split=defaults[role], endpoint=ckpt.endpoint, region=ckpt.region
        )
        for role, source in plan.sources.items()
    }
    mode = encoding.mode_for(spec.model, ds, readers.first_row(chunks["train"]))
    template = chat.resolve_template(tokenizer, ds.chat_template, spec.model.source) if mode == "chat" else None
    encoder = encoding.Encoder(tokenizer, spec.model, ds, mode, template)
    staging = place.local.with_name(f"{place.key}.build-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    writer = StoreWriter(staging)
    limits = {"train": ds.max_train_samples, "validation": ds.max_eval_samples}
    counts = tokenize_into(
        writer,
        encoder,
        [(role, role_chunks, limits[role]) for role, role_chunks in chunks.items()],
        workers=available_cpus(),
        progress=_progress_reporter(place, session),
    )
    for role, source in plan.sources.items():
        if counts[role].rows == 0:
            raise InvalidData(f"{source.uri}: no examples (empty dataset)")
    views = _views(writer, spec, counts)
    meta = {
        "key": place.key,
        "mode": mode,
        "views": views,
        "counts": {role: c.to_json() for role, c in counts.items()},
        "sources": {role: s.uri for role, s in plan.sources.items()},
    }
    writer.close(meta)
    datacache.install(staging, place.local)
    return counts


def _views(writer: StoreWriter, spec: FineTuneJobSpec, counts: dict[str, RoleCounts]) -> dict[str, Any]:
    """The train and validation views (a seeded validationSplit of the training part), and the packing."""
    ds = spec.dataset
    for role in counts:
        writer.ensure_part(role, [])
    views: dict[str, Any] = {"train": {"part": "train"}}
    train_lengths = None
    if "validation" in counts:
        views["validation"] = {"part": "validation"}
    elif ds.validation_split:
        n = counts["train"].examples
        order = np.random.default_rng(spec.training.seed).permutation(n)
        held = max(1, round(n * ds.validation_split)) if n else 0
        validation = np.sort(order[:held])[: ds.max_eval_samples or None]
        train = np.sort(order[held:])
        writer.write_array("train.index", train)
        writer.write_array("validation.index", validation)
        views = {"train": {"part": "train", "index": True}, "validation": {"part": "train", "index": True}}
        train_lengths = train
    if ds.packing:
        lengths = writer.lengths("train")
        if train_lengths is not None:
            lengths = lengths[train_lengths]
        rows = pack(lengths.tolist(), ds.max_length)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(r) for r in rows])
        writer.write_array("train.packed_offsets", offsets)
        writer.write_array("train.packed_members", np.fromiter((i for r in rows for i in r), dtype=np.int64))
        views["train"]["packed"] = True
    return views


def _obtain(place: datacache.CachePlace, build: Any, session: Session, timeout: float) -> str:
    """Make the store complete on this node; how it got here ("node", "storage", "built", "waited")."""
    leader = session.local_rank == 0
    try:
        if leader and place.local_complete:
            if session.rank == 0 and place.remote is not None and not datacache.remote_complete(place):
                datacache.upload(place)
            return "node"
        if session.rank == 0 or (leader and place.remote is None):
            if place.remote is not None and datacache.remote_complete(place):
                datacache.download(place)
                return "storage"
            build()
            if session.rank == 0 and place.remote is not None:
                datacache.upload(place)
            return "built"
        if leader:
            datacache.wait_for(place, remote=True, timeout=timeout, rank=session.rank, report=True)
            datacache.download(place)
            return "storage"
    except BaseException as error:
        if leader:
            datacache.publish_failure(place, error)
        raise
    datacache.wait_for(place, remote=False, timeout=timeout, rank=session.rank, report=session.local_rank == 1)
    return "waited"


# --------------------------------------------------------------------------- step 3: the rank's view


def check_dropped(report: DataReport, spec: FineTuneJobSpec, sources: dict[str, str]) -> None:
    """InvalidData when a source lost more than ``dataset.maxDroppedFraction`` of its examples, or all of them."""
    ds = spec.dataset
    for role, counts in report.parts.items():
        rows, dropped = int(counts["rows"]), sum(int(n) for n in counts["dropped"].values())
        detail = ", ".join(f"{reason}: {n:,}" for reason, n in counts["dropped"].items() if n)
        where = f"{sources.get(role, ds.train)}"
        if rows and dropped / rows > ds.max_dropped_fraction:
            raise InvalidData(
                f"{where}: {dropped:,} of {rows:,} {ROLE_NAMES[role]} examples ({dropped / rows:.1%}) have no "
                f"trainable token left after truncation to dataset.maxLength {ds.max_length} ({detail}), more "
                f"than dataset.maxDroppedFraction {ds.max_dropped_fraction}; raise dataset.maxLength or fix the data"
            )
        if rows and not counts["examples"]:
            raise InvalidData(f"{where}: no {ROLE_NAMES[role]} example is left after truncation ({detail})")


def load_training_data(spec: FineTuneJobSpec, tokenizer: Any, work_dir: Path, session: Session) -> TrainingData:
    """Read, validate and tokenize the job's data once per job; every rank maps the result."""
    ds, ckpt = spec.dataset, spec.checkpoint
    plan = _shared_plan(spec, tokenizer, session)
    place = datacache.CachePlace.for_job(plan.key, work_dir, ckpt.uri, ckpt.endpoint, ckpt.region, plan.nonce)
    size = sum(s.size for s in plan.sources.values())
    timeout = datacache.wait_timeout(size) + (2700.0 if any(s.kind == "hf" for s in plan.sources.values()) else 0.0)
    started = time.monotonic()
    how = _obtain(place, lambda: _build(place, spec, tokenizer, plan, work_dir, session), session, timeout)
    session.barrier()
    store = TokenStore.open(place.local)
    meta = store.meta
    parts = {role: {**meta["counts"][role]} for role in meta["counts"]}
    if ds.validation_split and "validation" in meta["views"]:
        parts["validation"] = {"rows": 0, "examples": len(store.view("validation")), "tokens": 0, "dropped": {}}
        parts["train"] = {**parts["train"], "examples": len(store.view("train"))}
    report = DataReport(meta["mode"], parts, {"key": place.key, "uri": place.remote or str(place.local), "how": how})
    check_dropped(report, spec, meta["sources"])
    _log(session, report, meta, how, time.monotonic() - started)
    train = store.view("train")
    validation = store.view("validation")
    packed = store.packed("train")
    if packed is not None:
        return TrainingData(train, validation, packed, packed.lengths(), report)
    return TrainingData(train, validation, train, train.lengths(), report)


def _log(session: Session, report: DataReport, meta: dict[str, Any], how: str, seconds: float) -> None:
    counts = ", ".join(
        f"{role} {c['examples']:,} examples" + (f" ({sum(c['dropped'].values()):,} dropped)" if c["dropped"] else "")
        for role, c in report.parts.items()
    )
    source = {"node": "found on this node", "storage": f"reused from {report.cache['uri']}", "built": "tokenized"}
    session.log(
        f"data: {meta['mode']} data, {counts}; token store {report.cache['key']} {source.get(how, how)} "
        f"in {seconds:.1f} s"
    )


def arrange(train: list[Example], validation: list[Example], *, packing: bool, max_length: int) -> TrainingData:
    """In-memory examples as the sampler's items: the examples, or packed rows of them."""
    lengths = [len(e.input_ids) for e in train]
    if not packing:
        return TrainingData(train, validation, train, lengths)
    rows = pack(lengths, max_length)
    items = [[train[i] for i in row] for row in rows]
    return TrainingData(train, validation, items, [sum(lengths[i] for i in row) for row in rows])
