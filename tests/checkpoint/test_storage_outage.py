"""The S3 server dies in the middle of a checkpoint upload (moto as a subprocess, SIGKILLed).

The trainer retries with backoff and gives that checkpoint up; no manifest
exists for it; training continues; once the server is back the next save
commits; a restart resumes from that last committed checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.checkpoint import tiny
from tests.support.processes import kill_tree
from tests.support.s3 import MotoProcess

CKPT = "checkpoints"
# Give up on an object after ~1 s of retries, so the upload fails while the server is down.
FAST_GIVE_UP = {
    "KUBETUNE_STORAGE_RETRY_ATTEMPTS": "3",
    "KUBETUNE_STORAGE_RETRY_BASE_SECONDS": "0.2",
    "KUBETUNE_STORAGE_RETRY_MAX_SECONDS": "0.5",
}


def tag(step: int) -> str:
    return f"step-{step:08d}"


def test_server_killed_mid_upload_then_next_save_commits_and_restart_resumes(
    moto_process: MotoProcess, tmp_path: Path
) -> None:
    import subprocess

    s3 = moto_process.endpoint
    assert moto_process.proc is not None
    back = tmp_path / "server-is-back"
    argv = tiny.command(
        2,
        uri=s3.uri("outage"),
        endpoint=s3,
        work=tmp_path / "first" / "work",
        out=tmp_path / "first" / "out",
        steps=30,
        every=10,
        kill_server_pid=moto_process.proc.pid,
        kill_server_at_step=20,
        wait_file=back,
    )
    log_path = tmp_path / "first.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            argv, env=tiny.env(FAST_GIVE_UP), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 240
            while moto_process.proc.poll() is None:  # rank 0 kills it right after the step-20 save began uploading
                assert proc.poll() is None, log_path.read_text()[-5000:]
                assert time.monotonic() < deadline, "the server was never killed"
                time.sleep(0.05)
            # Down long enough for the step-20 upload to exhaust its retries.
            failed = f"checkpoint {tag(20)}: upload failed"
            while failed not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()[-5000:]
                assert time.monotonic() < deadline, "the step-20 upload never gave up"
                time.sleep(0.1)
            moto_process.start()  # same port; replays what was stored before the outage
            back.touch()
            assert proc.wait(timeout=240) == 0, log_path.read_text()[-5000:]
        finally:
            if proc.poll() is None:  # torchrun and its workers: they wait for a file that may never come
                kill_tree(proc)
    first = log_path.read_text()
    assert "retrying in" in first  # backoff, then give up on step 20
    assert f"checkpoint {tag(20)} was NOT committed" in first  # noticed by the next save, training went on
    assert f"checkpoint {tag(30)} committed" in first

    keys = s3.keys(f"outage/{CKPT}/")
    assert f"outage/{CKPT}/{tag(20)}/MANIFEST.json" not in keys
    assert f"outage/{CKPT}/{tag(10)}/MANIFEST.json" in keys  # survived the outage
    assert f"outage/{CKPT}/{tag(30)}/MANIFEST.json" in keys
    assert not [k for k in keys if tag(20) in k]  # the debris of the broken save was cleaned after step 30
    assert s3.read(f"outage/{CKPT}/LATEST").decode().strip() == tag(30)

    again = tiny.run(2, uri=s3.uri("outage"), endpoint=s3, tmp=tmp_path, name="restart", steps=32, every=10)
    assert again.result["restored"]["step"] == 30
    assert again.result["restored"]["fell_back_from"] is None
    assert sorted(again.losses) == [31, 32]
