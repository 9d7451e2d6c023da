"""Kill each stage of dvc.yaml at a random moment and check that `dvc repro` recovers.

In a throwaway git + DVC repository holding what a clone of this project holds, with a
tiny configuration (``bench/common.py``'s ``TINY_PARAMS``, a corpus of ``--docs`` builtin
English Wikipedia articles, and pretraining long enough to be killed between snapshots),
the script first runs the whole pipeline once, timing each stage. Then, for every stage
of dvc.yaml in pipeline order (or those of ``--stages``), in each round:

1. forces the stage to run again with ``dvc repro -s -f STAGE``, in its own process
   group. For pretrain and rlhf the checkpoint folder is emptied first: a finished
   snapshot of the same run would otherwise be found and the outputs written without
   training (which is what a kill after the last snapshot needs), leaving nothing to kill;
2. kills the whole group (dvc and the stage command under it) with SIGKILL at a random
   point (seeded): after a delay uniform over the stage's duration in the first run,
   counted from the "Running stage" line. A stage that declares a persist
   ``checkpoints/`` output (pretrain, rlhf: a resumable one) trains for a small part of
   its time, so it is killed instead the moment its snapshot reaches a random step
   (a multiple of the snapshot cadence, before the last step): then there is something
   to resume;
3. checks that no output is half-written: each output declared in dvc.yaml is absent or
   byte-identical to the complete version the run before the kill left (every stage is
   deterministic), except the few that vary from run to run (timings), persist ones and
   dvclive's live logs (which grow row by row while a stage runs, by design): their JSON
   files must parse and their TSV files hold whole rows of numbers;
4. runs ``dvc repro`` and checks that it succeeds, that ``dvc status`` is clean, that
   every object in .dvc/cache/files/md5 re-hashes to its name (this DVC has no
   ``dvc fsck``; a ``.dir`` object is the JSON listing of a folder and is named by the
   md5 of that listing), that every cached output of dvc.lock is in the cache, and that
   dvc.lock records the same output hashes as before the kill (except the run-to-run
   varying ones; a JSON file with the same values in another key order is noted, not
   failed). A temporary (``.<name>.tmp-<pid>``) the kill left stays when DVC restores
   the stage's outputs from its run cache instead of running it (a stage without persist
   outputs whose deps and params were run before, as a forced re-run's are); every stage
   start sweeps such temporaries, so one more stage is then run (``dvc repro -s -f
   ingest``, deterministic, so it changes nothing) and a temporary still there after it
   is reported as leaked ("yes, a temporary leaked");
5. for pretrain and rlhf, whether the re-run resumed ("resuming from step" in its output).
   rlhf is reported "did not resume" when dvc.yaml declares no persist checkpoints/ output
   for it (no resume to expect), rather than as a failure.

Two faults follow (unless ``--no-faults``), checked by the same steps 3-5 against
``dvc repro pretrain``:

- **a NaN injected mid-run**, in every round: pretraining forced with the trainer's
  testing hook ``GPTPIPE_FAULT_NAN_GRAD_AT_STEP`` set to a random step must stop with one
  line naming that step and leave the snapshot of the last good step, all finite;
- **a rank killed in a two-process run**, once, last: with ``train.nproc_per_node: 2``
  (CPU processes, gloo) the stage first runs uninterrupted (the reference), then is
  forced again and process 1 is SIGKILLed at a random snapshot: the other process must
  stop with one line naming it (within ``train.peer_timeout``), and the recovery must
  end with the reference's outputs.

It prints a Markdown table, one row per stage and round: the kill delay, whether the kill
landed while the stage command was running (else the stage had finished and DVC was
recording it), whether everything recovered, whether the re-run resumed, the seconds the
recovering ``dvc repro`` took, and notes (the temporaries the kill left, whether the
re-run restored the outputs from DVC's run cache, what failed).

Usage (from the repository root, with the project's virtual environment)::

    .venv/bin/python bench/kill_loop.py                            # one round, seed 0
    .venv/bin/python bench/kill_loop.py --rounds 3 --seed 7 --out bench/results-kill.md
    .venv/bin/python bench/kill_loop.py --stages tokenize,pretrain --keep
    .venv/bin/python bench/kill_loop.py --docs 2000 -S train.steps=200 -S model.n_embd=64
    .venv/bin/python bench/kill_loop.py --smallest                 # under a minute or two

Options:

  --seed N           seed of the kill delays (default 0)
  --rounds N         rounds over the stages (default 1)
  --stages LIST      comma-separated stages to kill (default: every stage of dvc.yaml)
  --docs N           corpus documents: builtin English articles (default 240)
  -S KEY=VALUE       override a param (YAML value), after the tiny configuration; repeat
  --work-dir DIR     where to make the scratch repository (default: the system temp)
  --keep             keep the scratch repository and the logs
  --out PATH         also write the Markdown report to PATH
  --no-faults        leave out the injected NaN and the killed rank
  --smallest         pretraining only (the stages before it run once), 40 steps on
                     SMALLEST_DOCS documents, with both faults: the test suite runs this

Exit status: 0 when every row recovered, 1 otherwise. About 2.5 minutes per round on two
CPU cores with the defaults. Its kill points depend on the machine's speed, so only the
smallest mode runs in the test suite (tests/test_bench.py), as a check that the
script still works, not as a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml
from common import BIN, TINY_PARAMS, scratch_repo, write_wiki_folder
from common import REPO_ROOT as REPO

from pipeline.core.io import find_temporaries

UP_TO_DATE = "Data and pipelines are up to date."
# Training long enough to land kills between snapshots: pretraining about 5 s on 2 cores
# with a snapshot every 20 steps; rlhf 6 steps (a snapshot at each evaluation, if any).
KILL_PARAMS = {
    **TINY_PARAMS,
    "train.steps": 200,
    "train.checkpoint_every": 20,
    "train.eval_every": 50,
    "rlhf.steps": 6,
}
# --smallest: pretraining alone, a few dozen steps, on a few documents.
SMALLEST_DOCS = 40
SMALLEST_PARAMS = {**TINY_PARAMS, "train.steps": 40, "train.checkpoint_every": 5,
                   "train.eval_every": 10}
# train.peer_timeout of the two-process fault: a frozen rank would be named this soon.
RANK_TIMEOUT = 20
# Each resumable stage's params section, step budget and snapshot cadence.
STEP_PARAMS = {"pretrain": ("train", "steps", "checkpoint_every"),
               "rlhf": ("rlhf", "steps", "eval_every")}
# Outputs whose bytes differ from run to run (docs/reproducibility.md): timings.
VARYING = {
    "metrics/pretrain_speed.json",
    "dvclive/pretrain/metrics.json",
    "dvclive/pretrain/plots/metrics",
}
RESUMABLE_BY_DESIGN = ("pretrain", "rlhf")


# ------------------------------------------------------------------------------ helpers


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"}


def _run(args: list[str], repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=repo, env=_env(), capture_output=True, text=True,
                          timeout=1800)


def _start(args: list[str], repo: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as handle:
        return subprocess.Popen(args, cwd=repo, env=_env(), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _stage_command_alive(process: subprocess.Popen) -> bool:
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        return False
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "gptpipe" in " ".join(child.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process group; return when none of its processes runs any more."""
    try:
        members = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        members = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    deadline = time.monotonic() + 30
    for member in members:
        while time.monotonic() < deadline:
            try:
                if member.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.005)


def _digest(path: Path) -> str | None:
    if not path.exists():
        return None
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(f"{file.relative_to(path)}\0{file.stat().st_size}\0".encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _well_formed(path: Path) -> bool:
    """Every JSON file parses and every TSV row has its header's fields, all numbers."""
    files = [path] if path.is_file() else sorted(path.rglob("*"))
    try:
        for file in files:
            if file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
            elif file.suffix == ".tsv":
                header, *rows = file.read_text(encoding="utf-8").splitlines()
                width = len(header.split("\t"))
                for row in rows:
                    fields = row.split("\t")
                    if len(fields) != width:
                        return False
                    [float(f) for f in fields]
    except (OSError, ValueError):
        return False
    return True


@dataclass
class Out:
    path: str
    stage: str
    cache: bool = True
    persist: bool = False


def _declared_outs(repo: Path) -> tuple[list[str], list[Out]]:
    """The stages of dvc.yaml in order, and every output they declare."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    outs = []
    for stage, body in stages.items():
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind, []):
                if isinstance(entry, str):
                    outs.append(Out(entry, stage))
                    continue
                for path, opts in entry.items():
                    opts = opts or {}
                    outs.append(Out(path, stage, opts.get("cache", True),
                                    opts.get("persist", False)))
    return list(stages), outs


def _lock_readable(repo: Path) -> bool:
    try:
        lock = yaml.safe_load((repo / "dvc.lock").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(lock, dict) and isinstance(lock.get("stages"), dict)


def _lock_outs(repo: Path) -> dict[str, str]:
    if not _lock_readable(repo):
        return {}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {out["path"]: out.get("md5", "") for entry in lock.values()
            for out in entry.get("outs", [])}


def _cache_problems(repo: Path, outs: list[Out]) -> list[str]:
    cache = repo / ".dvc/cache/files/md5"
    problems = []
    for obj in (p for p in cache.rglob("*") if p.is_file()):
        name = (obj.parent.name + obj.name).removesuffix(".dir")
        if hashlib.md5(obj.read_bytes()).hexdigest() != name:
            problems.append(f"corrupt cache object {obj.relative_to(repo)}")
    uncached = {o.path for o in outs if not o.cache}
    for path, md5 in _lock_outs(repo).items():
        if path in uncached:
            continue
        obj = cache / md5[:2] / md5[2:]
        if not obj.is_file():
            problems.append(f"{path}: {md5} not in the cache")
        elif md5.endswith(".dir"):
            for item in json.loads(obj.read_text()):
                if not (cache / item["md5"][:2] / item["md5"][2:]).is_file():
                    problems.append(f"{path}/{item['relpath']}: not in the cache")
    return problems


def _snapshot_info(repo: Path, out: Out, newer_than: float = 0.0) -> dict | None:
    """The state.json of the run folder's snapshot, if complete and newer than that."""
    state = repo / out.path / "snapshot" / "state.json"
    try:
        if state.stat().st_mtime > newer_than:
            return json.loads(state.read_text())
    except (OSError, ValueError):  # none yet, or being replaced
        pass
    return None


# ------------------------------------------------------------------------ the first run


def first_run(repo: Path, log: Path, target: str = "") -> dict[str, float]:
    """`dvc repro` of the whole pipeline (or up to ``target``); each stage's seconds from
    its "Running" line."""
    durations: dict[str, float] = {}
    current, started = None, 0.0
    with log.open("w") as handle:
        process = subprocess.Popen(["dvc", "repro", *filter(None, [target])], cwd=repo,
                                   env=_env(), text=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
        assert process.stdout is not None
        for line in process.stdout:
            handle.write(line)
            now = time.monotonic()
            if line.startswith("Running stage '"):
                current, started = line.split("'")[1], now
            elif line.startswith("Updating lock file") and current is not None:
                durations[current] = now - started
                current = None
        process.wait()
    if process.returncode != 0:
        sys.exit(f"the first dvc repro failed; see {log}")
    return durations


# ------------------------------------------------------------------------------ a kill


@dataclass
class Row:
    stage: str
    round: int
    delay: str = ""
    while_running: bool = False
    recovered: bool = False
    leaked: list[str] = field(default_factory=list)
    resumed: str = "n.a."
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _kill_at_random_point(process: subprocess.Popen, repo: Path, stage: str,
                          persist_ckpt: list[Out], duration: float, fraction: float,
                          log: Path, row: Row) -> float | None:
    """Kill the forced run's process group at the chosen point; when the stage started."""
    deadline = time.monotonic() + 600
    while f"Running stage '{stage}'" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(0.005)
    t_run = time.monotonic()
    started_wall = time.time()
    if persist_ckpt:
        # Training takes a small part of the stage's time, so a kill at a random second
        # mostly misses it: kill right after the snapshot of a random step instead.
        total, cadence = _budget(repo, stage)
        steps = list(range(cadence, total, cadence)) or [total]
        target = steps[min(int(fraction * len(steps)), len(steps) - 1)]
        info = None
        while process.poll() is None and time.monotonic() < deadline:
            info = _snapshot_info(repo, persist_ckpt[0], started_wall)
            if info is not None and int(info.get("step", 0)) >= target:
                break
            time.sleep(0.002)
        row.delay = f"{time.monotonic() - t_run:.2f} s"
        if info is not None:
            row.delay += f" (snapshot of step {info.get('step')})"
    else:
        delay = fraction * duration
        while process.poll() is None and time.monotonic() < t_run + delay:
            time.sleep(0.002)
        row.delay = f"{time.monotonic() - t_run:.2f} s"
    row.while_running = process.poll() is None and _stage_command_alive(process)
    _kill_group(process)
    return started_wall


@dataclass
class Before:
    """What the repository held before a kill: outputs, dvc.lock, temporaries."""

    lock: dict[str, str]
    digests: dict[str, str | None]
    json: dict[str, object]
    temps: set[str]


def _before(repo: Path, outs: list[Out]) -> Before:
    return Before(_lock_outs(repo), {o.path: _digest(repo / o.path) for o in outs},
                  {o.path: _load_json(repo / o.path) for o in outs if o.path.endswith(".json")},
                  set(find_temporaries(repo)))


def _checkpoints(outs: list[Out], stage: str) -> list[Out]:
    return [o for o in outs if o.stage == stage and o.persist
            and o.path.startswith("checkpoints/")]


def kill_and_recover(repo: Path, stage: str, outs: list[Out], duration: float,
                     fraction: float, logs: Path, row: Row, target: str = "") -> None:
    persist_ckpt = _checkpoints(outs, stage)
    before = _before(repo, outs)
    if persist_ckpt:
        shutil.rmtree(repo / persist_ckpt[0].path, ignore_errors=True)  # see step 1
    log = logs / f"{stage}-{row.round}-killed.log"
    process = _start(["dvc", "repro", "-s", "-f", stage], repo, log)
    try:
        started_wall = _kill_at_random_point(process, repo, stage, persist_ckpt, duration,
                                             fraction, log, row)
    finally:
        if process.poll() is None:
            _kill_group(process)
    if started_wall is None:
        row.notes.append("the stage never started")
        return
    snapshot = _snapshot_info(repo, persist_ckpt[0], started_wall) if persist_ckpt else None
    recover_and_check(repo, stage, outs, logs, row, before, snapshot, target)


def recover_and_check(repo: Path, stage: str, outs: list[Out], logs: Path, row: Row,
                      before: Before, snapshot: dict | None, target: str = "") -> None:
    """Steps 3-5 of the module docstring, after a kill (or a fault) of ``stage``."""
    left = [t for t in find_temporaries(repo) if t not in before.temps]
    if left:
        row.notes.append("the kill left " + ", ".join(left))
    half, live = [], []
    for o in outs:
        now = _digest(repo / o.path)
        if now is None or now == before.digests[o.path]:
            continue
        if (o.persist or o.path in VARYING) and _well_formed(repo / o.path):
            continue
        # dvclive's logs grow row by row while a stage runs (progress, by design): a
        # shorter log is fine, a torn row is not.
        if o.path.startswith("dvclive/") and _well_formed(repo / o.path):
            live.append(o.path)
            continue
        half.append(o.path)
    if live:
        row.notes.append("partial live log (whole rows) after the kill: " + ", ".join(live))
    if half:
        row.notes.append("half-written after the kill: " + ", ".join(half))

    if not _lock_readable(repo):
        # DVC rewrites dvc.lock in place (open "w+", then dump): a kill between the two
        # leaves it empty or cut, and `dvc repro` then stops with "'./dvc.lock'
        # validation failed". The remedy (docs/reproducibility.md): remove it (or git
        # checkout it); the re-run restores every stage from DVC's run cache.
        row.notes.append("the kill cut DVC's own rewrite of dvc.lock; removed it "
                         "(docs/reproducibility.md)")
        (repo / "dvc.lock").unlink()
    started = time.monotonic()
    result = _run(["dvc", "repro", *filter(None, [target])], repo)
    row.seconds = time.monotonic() - started
    (logs / f"{stage}-{row.round}-recovery.log").write_text(result.stdout + result.stderr)
    problems = []
    if result.returncode != 0:
        problems.append(f"dvc repro exited {result.returncode}")
    status = _run(["dvc", "status", *filter(None, [target])], repo)
    if UP_TO_DATE not in status.stdout:
        problems.append("dvc status: " + " ".join(status.stdout.split())[:200])
    if "is cached - skipping run" in result.stdout:
        row.notes.append("the re-run restored the outputs from DVC's run cache")
    # A temporary the re-run left (a run-cache restore runs no stage) must go at the
    # next stage start; one still there after that leaks disk space.
    remaining = [t for t in find_temporaries(repo) if t in left]
    if remaining:
        swept = _run(["dvc", "repro", "-s", "-f", "ingest"], repo)
        row.leaked = [t for t in find_temporaries(repo) if t in left]
        if swept.returncode == 0 and not row.leaked:
            row.notes.append("the next stage start (dvc repro -s -f ingest) removed "
                             + ", ".join(remaining))
    problems += _cache_problems(repo, outs)
    after_lock = _lock_outs(repo)
    changed = sorted(p for p in before.lock if p not in VARYING
                     and after_lock.get(p) != before.lock[p])
    # Same values in another order: not a wrong output, but dvc.lock changes all the same.
    reordered = [p for p in changed if before.json.get(p) is not None
                 and before.json[p] == _load_json(repo / p)]
    if reordered:
        row.notes.append("same values, other bytes (key order) than before the kill: "
                         + ", ".join(reordered))
    changed = [p for p in changed if p not in reordered]
    if changed:
        problems.append("dvc.lock hashes differ from before the kill: " + ", ".join(changed))
    row.notes += problems
    row.recovered = not problems and not half

    if stage in RESUMABLE_BY_DESIGN:
        row.resumed = _resumed(repo, stage, _checkpoints(outs, stage), snapshot,
                               result.stdout, row)
    if row.leaked:
        row.notes.append("still there after the next stage run: " + ", ".join(row.leaked))


# --------------------------------------------------------------------- injected faults


def nan_and_recover(repo: Path, outs: list[Out], logs: Path, row: Row,
                    rng: random.Random) -> None:
    """Pretraining poisoned by a NaN gradient at a random step (the trainer's testing
    hook): the stage must stop with one line naming the step, leave a snapshot of an
    earlier step that is all finite, and `dvc repro` must resume to the same outputs."""
    total, cadence = _budget(repo, "pretrain")
    bad = rng.randrange(cadence + 1, total)
    row.delay = f"NaN gradient at step {bad}"
    before = _before(repo, outs)
    checkpoint = _checkpoints(outs, "pretrain")[0]
    shutil.rmtree(repo / checkpoint.path, ignore_errors=True)
    log = logs / f"pretrain-nan-{row.round}.log"
    env = {**_env(), "GPTPIPE_FAULT_NAN_GRAD_AT_STEP": str(bad)}
    with log.open("w") as handle:
        subprocess.run(["dvc", "repro", "-s", "-f", "pretrain"], cwd=repo, env=env,
                       stdout=handle, stderr=subprocess.STDOUT, timeout=1800)
    said = [line for line in log.read_text().splitlines() if line.startswith("Error:")]
    expected = f"the gradient norm is nan at step {bad}"
    if len(said) != 1 or expected not in said[0]:
        row.notes.append(f"expected one line '{expected}', got: {said}")
    snapshot = _snapshot_info(repo, checkpoint)
    if snapshot is None or int(snapshot["step"]) != (bad - 1) // cadence * cadence:
        row.notes.append(f"the snapshot left is not the last good one: {snapshot}")
    elif not _finite_snapshot(repo / checkpoint.path / "snapshot"):
        row.notes.append("the snapshot left holds a non-finite tensor")
    notes = list(row.notes)
    recover_and_check(repo, "pretrain", outs, logs, row, before, snapshot, "pretrain")
    row.recovered = row.recovered and not notes


def rank_kill_and_recover(repo: Path, outs: list[Out], logs: Path, row: Row,
                          fraction: float) -> None:
    """Pretraining on two processes (torchrun, gloo), rank 1 killed at a snapshot: the
    other must stop within train.peer_timeout with one line naming it, and `dvc repro`
    must resume to the outputs of an uninterrupted two-process run (made first)."""
    _set_params(repo, {"train.nproc_per_node": 2, "train.device": "cpu",
                       "train.peer_timeout": RANK_TIMEOUT})
    first = _run(["dvc", "repro", "pretrain"], repo)  # the uninterrupted reference
    if first.returncode != 0:
        row.notes.append(f"the two-process run failed: {first.stderr[-300:]}")
        return
    before = _before(repo, outs)
    checkpoint = _checkpoints(outs, "pretrain")
    shutil.rmtree(repo / checkpoint[0].path, ignore_errors=True)
    log = logs / f"pretrain-rank-{row.round}.log"
    process = _start(["dvc", "repro", "-s", "-f", "pretrain"], repo, log)
    try:
        total, cadence = _budget(repo, "pretrain")
        steps = list(range(cadence, total, cadence)) or [total]
        target = steps[min(int(fraction * len(steps)), len(steps) - 1)]
        started_wall, info = time.time(), None
        deadline = time.monotonic() + 600
        while process.poll() is None and time.monotonic() < deadline:
            info = _snapshot_info(repo, checkpoint[0], started_wall)
            if info is not None and int(info.get("step", 0)) >= target:
                break
            time.sleep(0.002)
        victim = _rank_process(process, 1)
        row.delay = f"rank 1 killed after the snapshot of step {(info or {}).get('step')}"
        row.while_running = victim is not None
        killed = time.monotonic()
        if victim is not None:
            victim.kill()
        process.wait(timeout=RANK_TIMEOUT + 120)
        row.notes.append(f"the other process stopped {time.monotonic() - killed:.1f} s later")
    finally:
        if process.poll() is None:
            _kill_group(process)
    said = [line for line in log.read_text().splitlines()  # the survivor's, not torchrun's
            if "process 1 of 2" in line and "this process stopped too" in line]
    notes = [] if said else ["no line from the other process naming process 1"]
    row.notes += notes
    snapshot = _snapshot_info(repo, checkpoint[0])
    recover_and_check(repo, "pretrain", outs, logs, row, before, snapshot, "pretrain")
    row.recovered = row.recovered and not notes


def _rank_process(process: subprocess.Popen, rank: int) -> psutil.Process | None:
    """The torchrun worker of global ``rank`` under ``process``, if running."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error, KeyError):
                if "pipeline.cli" in " ".join(child.cmdline()) and (
                        child.environ()["RANK"] == str(rank)):
                    return child
    return None


def _finite_snapshot(folder: Path) -> bool:
    from safetensors.torch import load_file

    tensors = load_file(folder / "state.safetensors")
    return all(bool(t.isfinite().all()) for t in tensors.values() if t.is_floating_point())


def _set_params(repo: Path, overrides: dict[str, object]) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _budget(repo: Path, stage: str) -> tuple[int, int]:
    section, steps, cadence = STEP_PARAMS[stage]
    params = yaml.safe_load((repo / "params.yaml").read_text())[section]
    return int(params[steps]), max(1, int(params[cadence]))


def _resumed(repo: Path, stage: str, persist_ckpt: list[Out], snapshot: dict | None,
             output: str, row: Row) -> str:
    if not persist_ckpt:
        return f"did not resume (dvc.yaml declares no checkpoints/{stage})"
    if "holds this run, finished at step" in output:
        return "yes, finished snapshot: outputs written without training"
    if "resuming from step" in output:
        line = next(x for x in output.splitlines() if "resuming from step" in x)
        return "yes, " + line.split("resuming ", 1)[1].strip()
    if f"Running stage '{stage}'" not in output:
        return "n.a. (its outputs were complete: nothing re-ran)"
    if snapshot is None:
        return "no (no snapshot yet at the kill)"
    step = int(snapshot.get("step", 0))
    total = int(snapshot.get("total_steps", _budget(repo, stage)[0]))
    if step >= total:
        afresh = "the re-run trained afresh" if "afresh" in output else "the re-run"
        row.notes.append(f"killed after the final snapshot (step {step} of {total}), "
                         f"before DVC recorded the stage: {afresh}")
        return f"no (finished snapshot, step {step})"
    row.recovered = False
    return f"no, though a snapshot of step {step} was there"


# ----------------------------------------------------------------------------- report


def _report(rows: list[Row], args: argparse.Namespace, durations: dict[str, float],
            first_seconds: float) -> str:
    dvc_version = _run(["dvc", "--version"], REPO).stdout.strip()
    lines = [
        "# Kill loop",
        "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, DVC {dvc_version}",
        f"- seed {args.seed}, {args.rounds} round(s), corpus {args.docs} documents; "
        f"first full `dvc repro`: {first_seconds:.0f} s",
        "- stage seconds in the first run: "
        + ", ".join(f"{s} {d:.1f}" for s, d in durations.items()),
        "",
        "| stage | kill delay | killed while running | recovered | resumed | seconds | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        notes = "; ".join(row.notes).replace("|", "/")
        lines.append(
            f"| {row.stage} | {row.delay} | {'yes' if row.while_running else 'no'} | "
            f"{_recovered(row)} | {row.resumed} | {row.seconds:.1f} | "
            f"{notes} |"
        )
    return "\n".join(lines) + "\n"


def _recovered(row: Row) -> str:
    if not row.recovered:
        return "no"
    return "yes, a temporary leaked" if row.leaked else "yes"


def _parse_set(items: list[str]) -> dict[str, object]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            sys.exit(f"-S {item}: expected SECTION.KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--stages", default="")
    parser.add_argument("--docs", type=int, default=240)
    parser.add_argument("-S", dest="overrides", action="append", default=[])
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-faults", dest="faults", action="store_false")
    parser.add_argument("--smallest", action="store_true")
    args = parser.parse_args()
    if args.smallest:  # pretraining only, on a few documents: under a minute on 2 cores
        args.docs, args.stages = min(args.docs, SMALLEST_DOCS), args.stages or "pretrain"
    return args


def _rows(repo: Path, args: argparse.Namespace, stages: list[str], outs: list[Out],
          durations: dict[str, float], logs: Path) -> list[Row]:
    """Every kill of the loop, then the injected faults, each recovered and checked."""
    chosen = [s for s in args.stages.split(",") if s] or stages
    target = chosen[-1] if args.smallest else ""
    rng = random.Random(args.seed)
    rows = []
    for round_ in range(1, args.rounds + 1):
        for stage in chosen:
            row = Row(stage, round_)
            kill_and_recover(repo, stage, outs, durations.get(stage, 1.0), rng.random(),
                             logs, row, target)
            rows.append(row)
            _progress(row)
        if args.faults and "pretrain" in stages:
            rows.append(Row("pretrain, NaN injected", round_))
            nan_and_recover(repo, outs, logs, rows[-1], rng)
            _progress(rows[-1])
    if args.faults and "pretrain" in stages:  # last: it leaves two-process params
        rows.append(Row("pretrain, 2 processes, rank 1 killed", 1))
        rank_kill_and_recover(repo, outs, logs, rows[-1], rng.random())
        _progress(rows[-1])
    return rows


def _progress(row: Row) -> None:
    print(f"round {row.round}, {row.stage}: killed after {row.delay}, running "
          f"{row.while_running}, recovered {row.recovered}, resumed {row.resumed}",
          file=sys.stderr, flush=True)


def main() -> int:
    args = _arguments()
    work = Path(tempfile.mkdtemp(prefix="kill-loop-", dir=args.work_dir))
    try:
        base = SMALLEST_PARAMS if args.smallest else KILL_PARAMS
        repo = scratch_repo(work / "repo", {**base, **_parse_set(args.overrides)})
        write_wiki_folder(repo / "corpus", args.docs)
        logs = work / "logs"
        logs.mkdir()
        stages, outs = _declared_outs(repo)
        unknown = sorted(set(filter(None, args.stages.split(","))) - set(stages))
        if unknown:
            sys.exit(f"--stages: unknown {', '.join(unknown)}; dvc.yaml has {', '.join(stages)}")
        print(f"kill loop in {work}: first dvc repro ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        last = [s for s in args.stages.split(",") if s][-1] if args.smallest else ""
        durations = first_run(repo, logs / "first.log", last)
        first_seconds = time.monotonic() - started
        rows = _rows(repo, args, stages, outs, durations, logs)
        report = _report(rows, args, durations, first_seconds)
        print(report)
        if args.out:
            args.out.write_text(report)
        return 0 if all(r.recovered for r in rows) else 1
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
