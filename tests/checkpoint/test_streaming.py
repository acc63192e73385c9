"""Checkpoint files go to storage while DeepSpeed is still writing the rest (kubetune_trainer.checkpoint.streaming)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from kubetune_trainer.checkpoint.streaming import StreamedFiles
from kubetune_trainer.storage import open_store
from tests.support.s3 import free_port

REPO = Path(__file__).resolve().parents[2]

_SAVE_AND_LOAD = r"""
import json, sys
from pathlib import Path
import deepspeed, torch
from torch.utils.serialization import config as serialization_config
from kubetune_trainer.checkpoint.streaming import announcing_files, without_zip_checksums
from kubetune_trainer.nativeops import SHARED_MEMORY_COMM, load_native_ops

load_native_ops([SHARED_MEMORY_COMM], print)  # as the trainer does
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)

def engine():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    ds_config = {"train_batch_size": 1, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
                 "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)[0]

trained = engine()
for _ in range(3):
    loss = trained(torch.randn(8, 64)).pow(2).mean()
    trained.backward(loss)
    trained.step()
original_checkpoint_engine = trained.checkpoint_engine
announced = []
def on_written(path):
    announced.append({"name": path.name, "size_when_announced": path.stat().st_size})
out = Path(sys.argv[1])
with announcing_files(trained, on_written), without_zip_checksums():
    crc_inside = serialization_config.save.compute_crc32
    trained.save_checkpoint(str(out), tag="t", save_latest=False)
final_sizes = {p.name: p.stat().st_size for p in (out / "t").iterdir()}

fresh = engine()
fresh.load_checkpoint(str(out), tag="t")
same = all(torch.equal(a, b) for a, b in zip(trained.module.state_dict().values(), fresh.module.state_dict().values()))
print("RESULT " + json.dumps({
    "announced": announced,
    "final_sizes": final_sizes,
    "engine_restored": trained.checkpoint_engine is original_checkpoint_engine,
    "crc_inside": crc_inside,
    "crc_after": serialization_config.save.compute_crc32,
    "weights_equal_after_load": same,
}))
"""


def test_each_deepspeed_file_is_announced_complete_and_loads_without_zip_checksums(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": os.pathsep.join([str(REPO / "trainer_image"), str(REPO / "operator")]),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _SAVE_AND_LOAD, str(tmp_path / "ckpt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    names = [a["name"] for a in result["announced"]]
    # Both tensor files, each once, announced when DeepSpeed had finished writing it.
    assert sorted(names) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    for item in result["announced"]:
        assert item["size_when_announced"] == result["final_sizes"][item["name"]] > 0
    assert set(result["final_sizes"]) == set(names)  # nothing in the tag's folder was written another way
    assert result["engine_restored"] is True
    assert (result["crc_inside"], result["crc_after"]) == (False, True)
    assert result["weights_equal_after_load"] is True


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_streamed_files_upload_what_was_announced_and_what_was_not(tmp_path: Path) -> None:
    store = open_store((tmp_path / "store").as_uri())
    folder = tmp_path / "staging" / "step-1"
    folder.mkdir(parents=True)
    streamed = StreamedFiles(lambda: store.open_upload("ckpt/step-1/", move=True), folder)
    (folder / "model.pt").write_bytes(b"m" * 5000)
    streamed.add(folder / "model.pt")
    (folder / "optim.pt").write_bytes(b"o" * 9000)  # written while model.pt already transfers
    streamed.add(folder / "optim.pt")
    (folder / "zero_to_fp32.py").write_text("print('recover')\n")  # written without the checkpoint engine
    streamed.add_the_rest()
    entries = streamed.finish(rank=3)
    assert [(e.name, e.size, e.sha256, e.rank) for e in entries] == [
        ("model.pt", 5000, _sha256(b"m" * 5000), 3),
        ("optim.pt", 9000, _sha256(b"o" * 9000), 3),
        ("zero_to_fp32.py", 17, _sha256(b"print('recover')\n"), 3),
    ]
    assert store.get_bytes("ckpt/step-1/optim.pt") == b"o" * 9000
    assert store.get_bytes("ckpt/step-1/zero_to_fp32.py") == b"print('recover')\n"


def test_a_file_replaced_after_it_was_announced_is_uploaded_again(tmp_path: Path) -> None:
    store = open_store((tmp_path / "store").as_uri())
    folder = tmp_path / "staging" / "step-2"
    folder.mkdir(parents=True)
    streamed = StreamedFiles(lambda: store.open_upload("ckpt/step-2/", move=True), folder)
    (folder / "model.pt").write_bytes(b"old")
    streamed.add(folder / "model.pt")
    replacement = folder / "model.pt.new"
    replacement.write_bytes(b"new contents")
    os.replace(replacement, folder / "model.pt")  # a new file under the announced name
    streamed.add_the_rest()
    entries = streamed.finish(rank=0)
    assert [(e.name, e.size, e.sha256) for e in entries] == [("model.pt", 12, _sha256(b"new contents"))]
    assert store.get_bytes("ckpt/step-2/model.pt") == b"new contents"
