"""The user's own library (engine/study_library.py + engine/index.py) holds patient CTs' latents: it is private to the
user, its ids never carry a file or folder name, and a library that is not a folder is refused by every verb."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "engine", *args, "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env={**os.environ, **(env or {})})
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, (proc.stdout, proc.stderr[-2000:])
    return proc.returncode, json.loads(lines[0])


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_library_is_private_and_ids_carry_no_names(tmp_path, shared_data):
    home = tmp_path / "home"
    patient_dir = home / "scans" / "Doe_Jane_1957"
    patient_dir.mkdir(parents=True)
    ct = patient_dir / "Smith_John.nii.gz"
    shutil.copy(shared_data / "ct" / "lung1_image_small128.nii.gz", ct)
    library = home / "ct-library"
    code, out = run_cli("index", "--ct", str(ct), "--library", str(library), env={"HOME": str(home)})
    assert code == 0, out
    sid = out["indexed"][0]["id"]
    assert sid.startswith("ct-") and "Smith" not in sid and "Doe" not in sid, sid
    assert _mode(library) == 0o700
    for name in ("library.sqlite", "library.sqlite-wal", "library.sqlite-shm"):
        if (library / name).exists():
            assert _mode(library / name) == 0o600, (name, oct(_mode(library / name)))
    with sqlite3.connect(library / "library.sqlite") as db:
        (stored,) = db.execute("SELECT path FROM studies WHERE id=?", (sid,)).fetchone()
    assert stored == "~/scans/Doe_Jane_1957/Smith_John.nii.gz", stored
    assert str(home) not in stored
    # The stored path still finds the file: the indexed CT is the top result for its own latent.
    code, again = run_cli("index", "--ct", str(ct), "--library", str(library), env={"HOME": str(home)})
    assert code == 0 and again["indexed"][0] == {**out["indexed"][0], "added": False}


def test_a_library_that_is_a_file_is_refused_by_retrieve_and_index(tmp_path, shared_data):
    not_a_folder = tmp_path / "library.txt"
    not_a_folder.write_text("not a library")
    for args in (("retrieve", "--text", "right pleural effusion"),
                 ("index", "--ct", str(shared_data / "ct" / "lung1_image_small128.nii.gz"))):
        for how in ({"env": {"CT_WORKSTATION_LIBRARY": str(not_a_folder)}, "extra": ()},
                    {"env": {}, "extra": ("--library", str(not_a_folder))}):
            code, out = run_cli(*args, *how["extra"], env=how["env"])
            assert code == 2 and set(out) == {"error"}, (args, how, out)
            assert "is a file" in out["error"] and out["error"].endswith("."), out
