"""One run per output directory: two real processes started together into one directory, the command line run
into a directory another run holds, a holder killed with ``kill -9`` and the rerun that takes over, and a holder
file that names a dead process.

The runs read their images from a dataset whose one image waits for a gate file: the run holding the lock stops
there until the test opens the gate, so the holder is still running whatever the machine's speed, and nothing here
depends on timing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_extract import ROOT, make_folder

import fxfeat
from fxfeat.extraction.format import LOCK_HOLDER
from fxfeat.extraction.lock import output_lock

COUNT, GATE = 8, 5  # images; the gated one is image 5, in part 2 after parts 0 and 1 (shard size 2)

_RUN = """
import os, sys, time, torch, torchvision, fxfeat
sys.path.insert(0, {tests!r})
from test_extract import _TupleDataset
from pathlib import Path

class Gated(_TupleDataset):
    def __getitem__(self, index):
        while index == {gate} and not os.path.exists({opened!r}):
            time.sleep(0.02)
        return super().__getitem__(index)

torch.manual_seed(0)
model = torchvision.models.resnet18().eval()
paths = sorted(Path({data!r}).rglob("*.jpg"))
try:
    summary = fxfeat.extract(model, Gated(paths), {out!r}, shard_size=2, batch_size=1, num_workers=0,
                             progress=False, input_size=(3, 64, 64), dtype=torch.float32)
except fxfeat.FxFeatError as error:  # as the command line reports it
    print(f"fxfeat: error: {{error}}", file=sys.stderr)
    raise SystemExit(2)
print(summary)
"""


def _script(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The run's script, its output directory and its gate file (which opens the gated image)."""
    data = make_folder(tmp_path / "images", count=COUNT)
    script, out, gate = tmp_path / "run.py", tmp_path / "out", tmp_path / "gate"
    script.write_text(_RUN.format(tests=str(ROOT / "tests"), gate=GATE, opened=str(gate), data=str(data),
                                  out=str(out)))
    return script, out, gate


def _start(script: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_every_image_once(out: Path) -> None:
    arrays, metadata = fxfeat.load_features(out, verify=True)
    assert list(metadata["id"]) == list(range(COUNT))
    assert arrays["pooled"].shape == (COUNT, 512) and np.isfinite(np.asarray(arrays["pooled"])).all()
    assert not list((out / ".fxfeat" / "tmp").glob("*"))


def _holder_message(pid: int) -> str:
    return f"is being written by another fxfeat run: pid {pid} on {socket.gethostname()}"


def test_two_runs_started_together_one_writes_the_other_fails_naming_it(tmp_path):
    script, out, gate = _script(tmp_path)
    runs = [_start(script), _start(script)]
    deadline = time.time() + 240
    while all(run.poll() is None for run in runs):
        assert time.time() < deadline, "neither run stopped: the second did not fail at once"
        time.sleep(0.05)
    loser = next(run for run in runs if run.poll() is not None)
    holder = next(run for run in runs if run is not loser)
    _, stderr = loser.communicate()
    assert loser.returncode == 2, stderr[-3000:]
    assert _holder_message(holder.pid) in stderr and str(script) in stderr, stderr
    assert "wait for that run to finish" in stderr
    # the command line, into the directory the holder still holds (it waits at the gate): exit 2, no traceback
    command = [sys.executable, "-m", "fxfeat", "extract", "torchvision:resnet18", str(tmp_path / "images"), "--out",
               str(out), "--weights", "random", "--input-size", "3", "64", "64", "--quiet"]
    cli = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr, cli.stderr[-3000:]
    assert cli.stderr.startswith("fxfeat: error: ") and _holder_message(holder.pid) in cli.stderr
    assert holder.poll() is None  # it held the lock all along
    gate.touch()
    stdout, stderr = holder.communicate(timeout=240)
    assert holder.returncode == 0, stderr[-3000:]
    assert f"{COUNT} images written" in stdout and "4 parts written, 0 kept" in stdout
    _assert_every_image_once(out)
    assert not (out / LOCK_HOLDER).exists()  # released with the run


def test_a_killed_holder_is_taken_over_by_the_rerun(tmp_path):
    script, out, gate = _script(tmp_path)
    killed = _start(script)
    records = out / ".fxfeat" / "parts"
    deadline = time.time() + 240
    while len(list(records.glob("*.json"))) < 2:  # parts 0 and 1 are done; the run waits at the gate in part 2
        assert killed.poll() is None and time.time() < deadline, killed.communicate()[1][-3000:]
        time.sleep(0.05)
    assert json.loads((out / LOCK_HOLDER).read_text())["pid"] == killed.pid
    killed.send_signal(signal.SIGKILL)  # no cleanup runs: the holder file stays and names a dead process
    killed.wait()
    gate.touch()
    rerun = _start(script)
    stdout, stderr = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, stderr[-3000:]
    assert "2 parts written, 2 kept" in stdout, stdout
    _assert_every_image_once(out)


def test_a_holder_file_naming_a_dead_process_is_not_believed(tmp_path):
    held = output_lock(tmp_path / "out")
    held.acquire()
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        stale = {"host": socket.gethostname(), "pid": dead.pid, "started": time.time() - 60, "command": "old run"}
        (tmp_path / "out" / LOCK_HOLDER).write_text(json.dumps(stale))
        with pytest.raises(fxfeat.OutputDirectoryError, match="has not yet written who it is") as error:
            output_lock(tmp_path / "out").acquire()
        assert f"pid {dead.pid}" not in str(error.value)
    finally:
        held.release()
    output_lock(tmp_path / "out").acquire()  # released: the stale file does not block the next run


def test_a_directory_of_other_files_is_refused_and_left_untouched(tmp_path):
    script, out, gate = _script(tmp_path)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    run = _start(script)
    _, stderr = run.communicate(timeout=240)
    assert run.returncode == 2 and "holds other files and no fxfeat manifest" in stderr, stderr[-3000:]
    assert os.listdir(out) == ["notes.txt"]
