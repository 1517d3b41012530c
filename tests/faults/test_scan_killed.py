"""A catalog scan killed mid-way: `aipd scan` as a real process on the test cluster, SIGKILLed once it has finished an
output file, then run again with the same --out. (A killed and resumed search is tests/tuning/test_tune_integration.py's
test_interrupted_experiment_resumes_without_redoing_trials.)"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import jpeg, make_checkpoint, wait_until

pytestmark = pytest.mark.slow

# serving/scan.py writes 4096 rows to a file: a catalog larger than that has a finished file before the scan ends.
FILES = 5000


def _catalog(root: Path) -> list[str]:
    photos = [jpeg(48, 48, seed=seed, quality=80) for seed in range(16)]
    paths = []
    for i in range(FILES):
        path = root / f"shelf-{i // 500:02d}" / f"photo-{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(photos[i % len(photos)])
        paths.append(str(path))
    return paths


def _rows_per_path(out: Path) -> collections.Counter:
    """How many rows each path has over every readable output file (a file cut short by the kill is unreadable)."""
    import pyarrow.parquet as pq

    from app.scan_results import output_files

    counts: collections.Counter = collections.Counter()
    for file_path, fs in output_files(str(out)):
        try:
            counts.update(pq.read_table(file_path, columns=["path"], filesystem=fs).column("path").to_pylist())
        except Exception:  # noqa: BLE001 - a partial file; the scan skips it the same way
            continue
    return counts


def test_a_killed_scan_resumes_without_scoring_a_file_twice(ray_cluster, tmp_path: Path) -> None:
    """Fault: SIGKILL of the `aipd scan` driver process after its first output file is written.

    May be lost: the rows of files not yet written when it died (and of a file it was writing), which the next run
    scans. No finished file is scored twice, and after the rerun every file has exactly one row.
    """
    from app.scan_results import output_files

    paths = _catalog(tmp_path / "catalog")
    checkpoint = make_checkpoint(tmp_path / "ckpt", seed=2)
    out = tmp_path / "out"
    address = ray_cluster.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "aipd.cli", "scan", str(tmp_path / "catalog"), "--out", str(out),
               "--model", str(checkpoint), "--address", address]  # fmt: skip
    env = {**os.environ, "AIPD_WORK_DIR": str(tmp_path / "work"), "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: first.poll() is not None or _rows_per_path(out), 300, what="a first output file")
            assert first.poll() is None, "the scan ended before it could be killed; see first.log"
            os.kill(first.pid, signal.SIGKILL)
        finally:
            first.wait(timeout=60)
    done = _rows_per_path(out)
    assert 0 < len(done) < FILES and set(done.values()) == {1}, f"{len(done)} files done at the kill"
    # A writer killed mid-file leaves the first bytes of a Parquet file and no footer: one more such file.
    data = max((Path(path).read_bytes() for path, _ in output_files(str(out))), key=len)
    (out / "cut-short-by-a-kill.parquet").write_bytes(data[: len(data) // 2])

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rows = _rows_per_path(out)
    assert set(rows) == set(paths), f"{len(set(paths) - set(rows))} files have no row"
    assert set(rows.values()) == {1}, [path for path, n in rows.items() if n > 1][:5]
    assert f"{len(done):,} already done" in again.stdout, again.stdout
    print(f"\nscan: {len(done)} of {FILES} files done at the kill, the rerun scanned {FILES - len(done)}")
