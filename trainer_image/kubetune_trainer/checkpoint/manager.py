"""CheckpointManager: save, upload, commit, verify, resume, retention (DESIGN §5, issue 4).

Save (collective): DeepSpeed ``save_checkpoint`` into this rank's own staging
folder on node-local disk (``save_latest=False``: DeepSpeed's ``latest`` file is
never written nor trusted) plus this rank's RNG states; each file starts
uploading (and being hashed) as soon as it is written, while DeepSpeed writes
the next → every rank waits for its own uploads → all ranks exchange what they
uploaded → global rank 0 writes ``MANIFEST.json`` (every object with size and
sha256) → only then ``LATEST`` moves → retention.  With ``async_upload`` the
rest of the upload and the commit run in one background thread (at most one in
flight; the next save waits for it).
All collectives of the manager run on a gloo process group of its own (:mod:`.ranks`), so the
background thread never interleaves with the training collectives.

Resume (collective): rank 0 lists the committed steps, newest first, and checks
each manifest against the listing (every object present, sizes match); every
rank downloads the files it needs and checks their sha256; the first checkpoint
that verifies on every rank is loaded with its explicit tag.  A failing one is
skipped (log line, ``checkpoint_fallbacks_total``, ``fell_back_from``).  At
another world size a ZeRO checkpoint is converted to DeepSpeed's universal
format on each node and loaded from there.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer.checkpoint import compat, rng
from kubetune_trainer.checkpoint.manifest import (
    CHECKPOINTS_PREFIX,
    LATEST_KEY,
    RNG_FILE_PATTERN,
    FileEntry,
    Manifest,
    build_manifest,
    listing_problems,
    manifest_key,
    prefix_of,
    resume_candidates,
    retention_plan,
    scan,
    tag_for,
)
from kubetune_trainer.checkpoint.ranks import Ranks
from kubetune_trainer.checkpoint.restore import (
    RESTORE_DIR,
    discard_fetched,
    fetch_for_rank,
    has_frozen_parameters,
    library_versions,
    load_fetched,
)
from kubetune_trainer.checkpoint.streaming import StreamedFiles, announcing_files, without_zip_checksums
from kubetune_trainer.errors import IncompatibleCheckpoint
from kubetune_trainer.spec.runtime import ENV_JOB_UID
from kubetune_trainer.storage import ObjectInfo, StorageUnavailable, Store

log = logging.getLogger("kubetune_trainer.checkpoint")


_UNAVAILABLE = "unavailable: "  # marks a storage outage in errors exchanged between ranks
_NOT_RESUMED = "not resumed: "  # another job's checkpoint that spec.checkpoint.resume says to leave


@dataclass(frozen=True)
class RestoredCheckpoint:
    """The checkpoint training resumed from."""

    step: int
    client_state: dict[str, Any]
    fell_back_from: int | None  # the newer step that failed verification, when one did
    uri: str


@dataclass(frozen=True)
class _Outcome:
    """What one save ended as, agreed by every rank."""

    step: int
    committed: bool
    error: str | None = None


class CheckpointManager:
    """Checkpoints of one job under ``<uri>/checkpoints/``; every rank constructs one (collective)."""

    def __init__(
        self,
        uri: str,
        *,
        store: Store,
        work_dir: Path,
        keep_last: int,
        async_upload: bool,
        spec_hash: str,
        metrics: Any | None = None,
        max_failed_saves: int = 3,
        compatibility: Mapping[str, Any] | None = None,
        resume: str = compat.IF_COMPATIBLE,
        job_uid: str | None = None,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"checkpoint.keepLast must be >= 1, got {keep_last}")
        self.uri = uri.rstrip("/")
        self.store = store
        self.work_dir = Path(work_dir)
        self.keep_last = keep_last
        self.async_upload = async_upload
        self.spec_hash = spec_hash
        self.compatibility = dict(compatibility or {})
        self.resume_policy = resume
        # Set by the operator on every pod of one FineTuneJob: its own checkpoints always resume.
        self.job_uid = job_uid if job_uid is not None else os.environ.get(ENV_JOB_UID, "")
        self.metrics = metrics
        self.max_failed_saves = max_failed_saves
        self._ranks = Ranks()
        self.rank, self.world_size, self.local_rank = self._ranks.rank, self._ranks.world_size, self._ranks.local_rank
        self._thread: threading.Thread | None = None
        self._thread_outcome: _Outcome | None = None
        self._last_outcome: _Outcome | None = None
        self._failed_in_a_row = 0
        self.committed_step: int | None = None
        # Of the last finished save: from save() until LATEST moved (rank 0), or until rank 0's decision arrived.
        self.last_save_seconds: float | None = None

    # ------------------------------------------------------------------ metrics (duck-typed, all optional)

    def _metric(self, name: str) -> Any | None:
        return getattr(self.metrics, name, None) if self.metrics is not None else None

    def _observe(self, phase: str, seconds: float) -> None:
        histogram = self._metric("checkpoint_seconds")
        if histogram is not None:
            histogram.labels(phase=phase).observe(seconds)

    def _committed_metrics(self, step: int, at: float | None = None) -> None:
        if (gauge := self._metric("checkpoint_step")) is not None:
            gauge.set(step)
        if (gauge := self._metric("checkpoint_timestamp_seconds")) is not None:
            gauge.set(time.time() if at is None else at)

    # ------------------------------------------------------------------ save

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> None:
        """Save a checkpoint of ``step`` (collective).  Waits for the previous upload first.

        Raises StorageUnavailable when ``max_failed_saves`` saves in a row could not be committed.
        """
        self._wait()
        tag = tag_for(step)
        started = time.monotonic()
        staging = self.work_dir / "checkpoint-staging" / f"rank-{self.rank:05d}"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / tag).mkdir(parents=True)
        frozen = has_frozen_parameters(engine)
        streamed = StreamedFiles(lambda: self.store.open_upload(prefix_of(tag), move=True), staging / tag)
        try:
            # Each rank saves into its own folder: local ranks share the node's disk, and each folder then holds
            # exactly the files its rank wrote, which that rank uploads.
            with announcing_files(engine, streamed.add), without_zip_checksums():
                engine.save_checkpoint(
                    str(staging),
                    tag=tag,
                    client_state=client_state,
                    save_latest=False,
                    exclude_frozen_parameters=frozen,
                )
            rng_file = staging / tag / RNG_FILE_PATTERN.format(rank=self.rank)
            rng.save(rng_file)
            streamed.add(rng_file)
            streamed.add_the_rest()
        except BaseException:
            streamed.cancel()
            raise
        self._observe("save", time.monotonic() - started)
        zero_stage = int(engine.zero_optimization_stage())

        def job() -> _Outcome:
            return self._upload_and_commit(step, staging / tag, zero_stage, streamed, started)

        if self.async_upload:
            self._thread = threading.Thread(target=self._run_job, args=(job, step), name=f"checkpoint-{tag}")
            self._thread.start()
        else:
            self._settle(job())

    def _run_job(self, job: Callable[[], _Outcome], step: int) -> None:
        try:
            self._thread_outcome = job()
        except Exception as exc:  # a failed collective: this save is lost, training decides what next
            log.exception("checkpoint %s: upload thread failed", tag_for(step))
            self._thread_outcome = _Outcome(step, committed=False, error=f"{type(exc).__name__}: {exc}")

    def _upload_and_commit(
        self, step: int, local_dir: Path, zero_stage: int, streamed: StreamedFiles, started: float
    ) -> _Outcome:
        tag = tag_for(step)
        mine: list[FileEntry] | None = None
        error: str | None = None
        try:
            entries = streamed.finish(self.rank)
            self._observe("upload", time.monotonic() - streamed.started)
            if (counter := self._metric("checkpoint_bytes_total")) is not None:
                counter.inc(sum(e.size for e in entries))
            mine = entries
        except Exception as exc:
            error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
            log.error("checkpoint %s: upload failed: %s", tag, error)
        # The barrier of the protocol: nobody commits before every rank's files are in storage.
        gathered = self._ranks.all_gather((mine, error))
        errors = [err for _files, err in gathered if err]
        decision: tuple[bool, str | None] | None = None
        if self.rank == 0:
            decision = (False, "; ".join(errors)) if errors else self._commit(step, zero_stage, gathered)
            self.last_save_seconds = time.monotonic() - started
            if decision[0]:
                # Before the broadcast: no rank starts the next save (and its uploads) while retention still
                # deletes folders and aborts the multipart uploads it takes for debris.
                self._retain(step)
        committed, reason = self._ranks.broadcast(decision) or (False, "no decision from rank 0")
        if self.rank != 0:
            self.last_save_seconds = time.monotonic() - started
        if committed:
            # Now, not when the next save settles this upload: with async uploads that is a whole interval
            # later, and status.checkpoint and CheckpointOverdue read these gauges.
            self._committed_metrics(step)
        shutil.rmtree(local_dir, ignore_errors=True)
        return _Outcome(step, committed, reason)

    def _retain(self, just_committed: int) -> None:
        """Rank 0, after a commit: retention, as its own timed phase; a failure waits for the next commit."""
        started = time.monotonic()
        try:
            self._apply_retention(just_committed)
        except Exception as exc:
            log.warning(
                "checkpoint retention after %s failed: %s: %s", tag_for(just_committed), type(exc).__name__, exc
            )
        self._observe("retention", time.monotonic() - started)

    def _commit(self, step: int, zero_stage: int, gathered: list[Any]) -> tuple[bool, str | None]:
        """Rank 0: write the manifest, then move LATEST."""
        tag = tag_for(step)
        started = time.monotonic()
        try:
            manifest = build_manifest(
                step=step,
                world_size=self.world_size,
                zero_stage=zero_stage,
                spec_hash=self.spec_hash,
                job_uid=self.job_uid,
                compatibility=self.compatibility,
                per_rank_files=[files for files, _err in gathered],
                versions=library_versions(),
                created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            )
            self.store.put_bytes(manifest_key(tag), manifest.to_json())
            self.store.put_bytes(LATEST_KEY, f"{tag}\n".encode())
        except Exception as exc:
            log.error("checkpoint %s: commit failed: %s: %s", tag, type(exc).__name__, exc)
            return False, f"commit: {type(exc).__name__}: {exc}"
        self._observe("commit", time.monotonic() - started)
        log.info(
            "checkpoint %s committed: %s/%s (%d files, %d bytes)",
            tag,
            self.uri,
            prefix_of(tag).rstrip("/"),
            len(manifest.files),
            manifest.total_bytes,
        )
        return True, None

    def _apply_retention(self, just_committed: int) -> None:
        stored = scan(self.store.list(CHECKPOINTS_PREFIX))
        for step in retention_plan(stored, just_committed=just_committed, keep_last=self.keep_last):
            log.info("checkpoint retention: deleting %s", tag_for(step))
            self.store.delete_prefix(prefix_of(tag_for(step)))
        # No upload of this job is running now (ours just finished), so every open multipart upload is debris.
        aborted = self.store.abort_incomplete_uploads(CHECKPOINTS_PREFIX)
        if aborted:
            log.info("checkpoint retention: aborted %d incomplete multipart upload(s)", aborted)

    def _wait(self) -> None:
        """Wait for the upload in flight, if any, and account for its outcome."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            outcome = self._thread_outcome
            self._thread_outcome = None
            if outcome is not None:
                self._settle(outcome)

    def _settle(self, outcome: _Outcome) -> None:
        self._last_outcome = outcome
        if outcome.committed:
            self.committed_step = outcome.step
            self._failed_in_a_row = 0
            return
        self._failed_in_a_row += 1
        log.error(
            "checkpoint %s was NOT committed (%d in a row): %s",
            tag_for(outcome.step),
            self._failed_in_a_row,
            outcome.error,
        )
        if self._failed_in_a_row >= self.max_failed_saves:
            raise StorageUnavailable(
                f"{self._failed_in_a_row} checkpoints in a row could not be committed to {self.uri}: {outcome.error}"
            )

    @property
    def upload_in_flight(self) -> bool:
        """True while a background upload runs."""
        return self._thread is not None and self._thread.is_alive()

    def finish(self) -> None:
        """Wait for the upload in flight and its commit (collective); StorageUnavailable if the last save failed."""
        self._wait()
        last = self._last_outcome
        if last is not None and not last.committed:
            raise StorageUnavailable(f"checkpoint {tag_for(last.step)} could not be committed: {last.error}")

    # ------------------------------------------------------------------ resume

    def restore(self, engine: Any) -> RestoredCheckpoint | None:
        """Load the newest checkpoint that verifies (collective); None when there is none."""
        self._wait()
        started = time.monotonic()
        survey: tuple[list[int], list[ObjectInfo], str | None] | str | None = None
        if self.rank == 0:
            try:
                listing = self.store.list(CHECKPOINTS_PREFIX)
                latest = _read_latest(self.store)
                candidates = resume_candidates(scan(listing))
                if latest and candidates and latest != tag_for(candidates[0]):
                    log.warning(
                        "checkpoints/LATEST says %s but the newest manifest is %s", latest, tag_for(candidates[0])
                    )
                survey = (candidates, listing, latest)
            except StorageUnavailable as exc:
                survey = str(exc)  # every rank raises it below, instead of waiting for rank 0 forever
        survey = self._ranks.broadcast(survey)
        if isinstance(survey, str) or survey is None:
            raise StorageUnavailable(survey or "no checkpoint survey from rank 0")
        candidates, listing, latest = survey

        chosen: Manifest | None = None
        load_dir: Path | None = None
        skipped: list[int] = []
        for step in candidates:
            manifest, load_dir, problem = self._verify_and_fetch(step, listing)
            if problem is None:
                chosen = manifest
                break
            if problem.startswith(_NOT_RESUMED):
                continue  # deleted below with everything newer than what is resumed
            skipped.append(step)
            log.error("checkpoint %s failed verification, falling back to an older one: %s", tag_for(step), problem)
            if (counter := self._metric("checkpoint_fallbacks_total")) is not None:
                counter.inc()

        self._discard_newer_than(chosen.step if chosen else -1, latest, listing)
        if chosen is None or load_dir is None:
            if skipped:
                log.error(
                    "no checkpoint under %s verified (tried %s): starting from scratch",
                    self.uri,
                    ", ".join(tag_for(s) for s in skipped),
                )
            return None

        client_state = self._load(engine, chosen, load_dir)
        self._observe("restore", time.monotonic() - started)
        self.committed_step = chosen.step
        # When it was saved, not now: status.checkpoint.time and the CheckpointOverdue alert must not
        # count a restart as a fresh checkpoint.
        self._committed_metrics(chosen.step, at=chosen.saved_at)
        uri = f"{self.uri}/{prefix_of(chosen.tag).rstrip('/')}"
        fell_back_from = skipped[0] if skipped else None
        log.info(
            "resumed from checkpoint %s (step %d, saved at world size %d, now %d)%s",
            uri,
            chosen.step,
            chosen.world_size,
            self.world_size,
            f"; fell back from {tag_for(fell_back_from)}" if fell_back_from is not None else "",
        )
        return RestoredCheckpoint(chosen.step, client_state, fell_back_from, uri)

    def _verify_and_fetch(
        self, step: int, listing: list[ObjectInfo]
    ) -> tuple[Manifest | None, Path | None, str | None]:
        """Check one checkpoint (manifest vs listing on rank 0, sha256 of downloads on every rank)."""
        tag = tag_for(step)
        checked: tuple[bytes | None, str | None] | None = None
        if self.rank == 0:
            try:
                raw = self.store.get_bytes(manifest_key(tag))
                problems = listing_problems(Manifest.from_json(raw, source=manifest_key(tag)), listing)
                checked = (raw, "; ".join(problems) or None)
            except (ValueError, FileNotFoundError) as exc:
                checked = (None, str(exc))
            except StorageUnavailable as exc:
                checked = (None, f"{_UNAVAILABLE}{exc}")
        agreed, problem = self._ranks.broadcast(checked)  # type: ignore[misc]
        if problem is not None and problem.startswith(_UNAVAILABLE):
            raise StorageUnavailable(problem[len(_UNAVAILABLE) :])
        if problem is not None or agreed is None:
            return None, None, problem or "manifest unreadable"
        manifest = Manifest.from_json(agreed)
        verdict = self._judge(manifest)
        if not verdict.resume:
            return None, None, _NOT_RESUMED + (verdict.note or "")
        load_dir: Path | None = None
        error: str | None = None
        try:
            load_dir = self._fetch(manifest)
        except StorageUnavailable as exc:
            error = f"{_UNAVAILABLE}rank {self.rank}: {exc}"
        except Exception as exc:
            error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        errors = [e for e in self._ranks.all_gather(error) if e]
        # Storage down is not a broken checkpoint: do not fall back to an older one, fail (retryable).
        if unavailable := [e for e in errors if e.startswith(_UNAVAILABLE)]:
            raise StorageUnavailable(unavailable[0][len(_UNAVAILABLE) :])
        if errors:
            return None, None, "; ".join(errors)
        return manifest, load_dir, None

    def _judge(self, manifest: Manifest) -> compat.Verdict:
        """Whether this job may resume ``manifest`` (every rank decides alike; a mismatch fails the job)."""
        verdict = compat.judge(
            uri=f"{self.uri}/{prefix_of(manifest.tag).rstrip('/')}",
            recorded_uid=manifest.job_uid,
            recorded=manifest.compatibility,
            job_uid=self.job_uid,
            current=self.compatibility,
            policy=self.resume_policy,
        )
        if verdict.error is not None:
            raise IncompatibleCheckpoint(verdict.error)
        if verdict.note is not None and self.rank == 0:
            log.warning("%s", verdict.note)
        return verdict

    def _fetch(self, manifest: Manifest) -> Path:
        """Download (and check) what this rank loads; returns the folder to pass to ``load_checkpoint``."""
        return fetch_for_rank(
            self.store, manifest, self.work_dir / RESTORE_DIR, self.rank, self.local_rank, self.world_size
        )

    def _load(self, engine: Any, manifest: Manifest, load_dir: Path) -> dict[str, Any]:
        # Every rank must have its files before anyone loads (universal: the node's conversion is done).
        self._ranks.barrier()
        client_state = load_fetched(engine, manifest, load_dir, self.rank, self.world_size)
        self._ranks.barrier()  # nobody deletes a shared (node) folder another rank still reads
        discard_fetched(self.work_dir / RESTORE_DIR, self.rank, self.local_rank)
        return client_state

    def _discard_newer_than(self, step: int, latest: str | None, listing: list[ObjectInfo]) -> None:
        """Rank 0 deletes folders newer than the resumed step (crashed saves, failed checkpoints), then all sync.

        Nothing of this job uploads now, and the steps after the resumed one are
        about to be saved again: stale objects must not mix into those folders.
        """
        if self.rank == 0:
            stored = scan(listing)
            for doomed in [s for s in (*stored.committed, *stored.uncommitted) if s > step]:
                log.warning("checkpoint %s: deleting (newer than the checkpoint resumed from)", tag_for(doomed))
                self.store.delete_prefix(prefix_of(tag_for(doomed)))
            self.store.abort_incomplete_uploads(CHECKPOINTS_PREFIX)
            if step >= 0 and latest != tag_for(step):
                self.store.put_bytes(LATEST_KEY, f"{tag_for(step)}\n".encode())
        self._ranks.barrier()


def _read_latest(store: Store) -> str | None:
    try:
        return store.get_bytes(LATEST_KEY).decode().strip() or None
    except FileNotFoundError:
        return None
