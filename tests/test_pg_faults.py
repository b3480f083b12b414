"""A Postgres (pgvector) target under faults, against a real server (tests/pg.py), no mocks:
the day-2 run SIGKILLed at ten points, its connection terminated by the server at three, and
two runs on one table at once.

The points are made deterministic without hooks in hfbatch: the test's own connections hold
Postgres locks that hfbatch's statements must wait for (seen waiting in pg_stat_activity, where
hfbatch's session has application_name 'hfbatch'), then hfbatch is killed there, then the locks
are let go. A lock on the table in SHARE mode lets the run read the table and COPY its rows into
its temporary table, and stops it at its merge (the first statement writing the table); one on
hfbatch_targets stops it at the record's upsert (the last statement before COMMIT); the table's
advisory lock, held here, stops it while planning; an ACCESS EXCLUSIVE lock queued behind the
run's own transaction is granted at its COMMIT and stops it at its next query of the table; a
stdout pipe filled beforehand (nobody reading) stops it printing its report, once it is done.

Helpers (the rows of day 1 and day 2, the subprocess and in-process runs) are test_sync.py's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql
from test_sync import day_rows, embed, start, sub_env, write_rows

from hfbatch.io.targets.postgres import LOCK_CLASS

pytestmark = pytest.mark.timeout(240)

HASH = "_hfbatch_hash"
N = 300
K2_IDS = [i for i in range(N) if i % 30 != 7] + list(range(5000, 5010))  # 10 gone, 10 new
K2_CHANGED = {i: 4 for i in range(0, N, 3)}  # 100 texts changed
# a second day-2 input for the concurrency tests: other ids gone and new, other texts changed
K3_IDS = [i for i in range(N) if i % 50 != 3] + list(range(6000, 6005))
K3_CHANGED = {i: 7 for i in range(1, N, 10)}
PRISTINE = "pgf_day1"
WAITED = "another hfbatch run holds this table"


@dataclass
class World:
    root: Path
    cache: Path  # every day-1, day-2 (k2) and k3 text is in it
    k1: Path
    k2: Path
    k3: Path
    day1: dict[int, str]
    day2: dict[int, str]  # k2 over day 1
    day3: dict[int, str]  # k3 over day 1


@pytest.fixture(scope="module")
def world(pg: Any, tmp_path_factory: pytest.TempPathFactory) -> World:
    """Day 1 written once (in-process: the model loads once for the module), and what day 2 (and
    k3) make of it, each on a copy."""
    root = tmp_path_factory.mktemp("pgfaults")
    cache = root / "cache"
    k1 = write_rows(root / "k1.parquet", day_rows(range(N)))
    k2 = write_rows(root / "k2.parquet", day_rows(K2_IDS, K2_CHANGED))
    k3 = write_rows(root / "k3.parquet", day_rows(K3_IDS, K3_CHANGED))
    doc = embed(k1, "-o", pg.url(PRISTINE), "--id-column", "id", "--cache-dir", cache)
    assert doc["metrics"]["sync"]["inserted"] == N
    with pg.connect() as conn:
        day1 = state(conn, PRISTINE)
        assert version(conn, PRISTINE) == 1
        after = {}
        for name, src in (("pgf_ref2", k2), ("pgf_ref3", k3)):
            copy_day1(conn, name)
            embed(src, "-o", pg.url(name), "--id-column", "id", "--cache-dir", cache, "--delete-missing")
            assert version(conn, name) == 2
            after[name] = state(conn, name)
    for day, ids, changed in ((after["pgf_ref2"], K2_IDS, K2_CHANGED), (after["pgf_ref3"], K3_IDS, K3_CHANGED)):
        assert sorted(day) == sorted(ids)
        assert {i for i in day if i in day1 and day[i] != day1[i]} == {i for i in changed if i in day}
    return World(root, cache, k1, k2, k3, day1, after["pgf_ref2"], after["pgf_ref3"])


# --- the server's side ------------------------------------------------------------------------


def ident(table: str) -> sql.Composable:
    return sql.Identifier("public", table)


def copy_day1(conn: Any, table: str) -> str:
    """A copy of the day-1 table (rows, key, and its hfbatch_targets row: version 1)."""
    conn.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(ident(table), ident(PRISTINE)))
    conn.execute(sql.SQL("INSERT INTO {} SELECT * FROM {}").format(ident(table), ident(PRISTINE)))
    conn.execute("INSERT INTO hfbatch_targets (table_name, record, version, updated_at) SELECT %s, record, version, "
                 "updated_at FROM hfbatch_targets WHERE table_name = %s", (table, PRISTINE))
    return table


def state(conn: Any, table: str) -> dict[int, str]:
    """id -> content hash of every row (asserting no id is there twice)."""
    rows = conn.execute(sql.SQL("SELECT id, {} FROM {}").format(sql.Identifier(HASH), ident(table))).fetchall()
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1]
    return dict(rows)


def version(conn: Any, table: str) -> int | None:
    row = conn.execute("SELECT version FROM hfbatch_targets WHERE table_name = %s", (table,)).fetchone()
    return None if row is None else int(row[0])


def sessions(conn: Any) -> list[tuple[int, str | None, str | None, str]]:
    """hfbatch's sessions: (pid, wait_event_type, wait_event, query)."""
    return conn.execute("SELECT pid, wait_event_type, wait_event, query FROM pg_stat_activity "
                        "WHERE application_name = 'hfbatch'").fetchall()


def blocked_at(conn: Any, pattern: str) -> int | None:
    """The pid of an hfbatch session waiting for a lock in a statement matching `pattern`."""
    for pid, kind, _, query in sessions(conn):
        if kind == "Lock" and re.search(pattern, query or "", re.IGNORECASE | re.DOTALL):
            return int(pid)
    return None


RECORD = r"INSERT INTO \"public\".\"hfbatch_targets\""  # the record's upsert, the last before COMMIT


def merge(table: str) -> str:
    """After the COPY into the temp table: the first statement writing the table (the upsert from
    hfbatch_stage, or a DELETE of stale ids, whichever the run does first)."""
    return rf'^\s*(INSERT INTO|DELETE FROM) "public"\."{table}"'


def waiting_for_advisory(conn: Any, table: str) -> int | None:
    """The pid of an hfbatch session waiting for `table`'s advisory lock (planning)."""
    rows = conn.execute(
        "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
        "AND l.classid = %s::oid AND l.objid = hashtext(%s)::oid AND NOT l.granted AND a.application_name = 'hfbatch'",
        (LOCK_CLASS, f"public.{table}")).fetchall()
    return int(rows[0][0]) if rows else None


def advisory_holders(conn: Any, table: str | None = None) -> list[int]:
    """Who holds the advisory lock of `table` (None: of any table)."""
    which = "" if table is None else "AND objid = hashtext(%s)::oid "
    return [r[0] for r in conn.execute(
        f"SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s::oid {which}AND granted",
        (LOCK_CLASS, *([] if table is None else [f"public.{table}"]))).fetchall()]


def wait_no_sessions(conn: Any, table: str | None = None, timeout: float = 30) -> None:
    """No hfbatch session is left (a killed run's backend goes once its wait ends) and nobody
    holds the table's advisory lock (None: any table's)."""
    deadline = time.monotonic() + timeout
    while sessions(conn) or advisory_holders(conn, table):
        assert time.monotonic() < deadline, (sessions(conn), advisory_holders(conn, table))
        time.sleep(0.01)


class Blocker:
    """A connection of the test's own holding a lock in an open transaction (or a session
    advisory lock) until `release`. `wait=False`: the lock is asked for in a thread, queued
    behind others, and `granted` says when it came."""

    def __init__(self, pg: Any, statement: sql.Composable | str, params: tuple[Any, ...] = (), *, wait: bool = True):
        self.conn = pg.connect()
        self.pid = int(self.conn.info.backend_pid)
        self.conn.execute("BEGIN")
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        if wait:
            self.conn.execute(statement, params)
        else:
            self.thread = threading.Thread(target=self._take, args=(statement, params), daemon=True)
            self.thread.start()

    def _take(self, statement: Any, params: tuple[Any, ...]) -> None:
        try:
            self.conn.execute(statement, params)
        except BaseException as exc:  # noqa: BLE001 - reported by release
            self.error = exc

    @property
    def granted(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def release(self) -> None:
        if self.thread is not None:
            if self.thread.is_alive():  # (a failing test: a lock never granted is asked for no longer)
                self.conn.cancel()
            self.thread.join(timeout=30)
        if not self.conn.closed:
            self.conn.execute("ROLLBACK")
            self.conn.execute("SELECT pg_advisory_unlock_all()")
            self.conn.close()


def share(table: str) -> sql.Composable:
    """Readers and the COPY into a temp table go on; the run's DELETE and INSERT wait."""
    return sql.SQL("LOCK TABLE {} IN SHARE MODE").format(ident(table))


def share_targets() -> sql.Composable:
    return sql.SQL("LOCK TABLE {} IN SHARE MODE").format(ident("hfbatch_targets"))


def advisory(table: str) -> tuple[str, tuple[Any, ...]]:
    return "SELECT pg_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, f"public.{table}")


# --- the runs ---------------------------------------------------------------------------------


def run_args(world: World, pg: Any, table: str, cache: Path, src: Path | None = None, *more: Any) -> list[Any]:
    return [src or world.k2, "-o", pg.url(table), "--id-column", "id", "--cache-dir", cache, "--delete-missing",
            "--chunk-size", "50", "--batch-size", "8", *more]


def start_stuck_stdout(args: list[Any], env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen, int]:
    """`python -m hfbatch embed ARGS --json` whose stdout is a full pipe nobody reads: the run
    does all its work and then blocks printing its document (a slow reader). The pipe's read
    end is returned, to close once the process is gone."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    for chunk in (65536, 1):
        try:
            while True:
                os.write(write, b"x" * chunk)
        except BlockingIOError:
            pass
    os.set_blocking(write, True)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "hfbatch", "embed", *map(str, args), "--json"], env=env,
                                cwd=cwd, stdout=write, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    return proc, read


def wait_until(proc: subprocess.Popen, condition: Callable[[], Any], what: str, timeout: float = 60,
               pause: float = 0.005, conn: Any = None) -> Any:
    """Poll `condition` until it is true, failing if the process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: {(err or '')[-2000:]}")
        if time.monotonic() > deadline:
            seen = conn.execute("SELECT pid, application_name, state, wait_event_type, wait_event, left(query, 200) "
                                "FROM pg_stat_activity WHERE backend_type = 'client backend'").fetchall() if conn else ""
            pytest.fail(f"timed out waiting for {what}; the sessions: {seen}")
        time.sleep(pause)


def error_lines(stderr: str) -> list[str]:
    """stderr's lines less the waiting notices (a run that waited for the lock logs them)."""
    return [line for line in stderr.strip().splitlines()
            if line.strip() and (WAITED not in line or "gave up" in line)]


def one_line_error(proc: subprocess.Popen, stderr: str, password: str) -> str:
    assert proc.returncode == 1, (proc.returncode, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    assert password not in stderr, "the password is in a message"
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    return lines[0]


# --- 1. SIGKILL at ten points of a day-2 run --------------------------------------------------


@dataclass
class Run:
    pg: Any
    conn: Any
    table: str
    tmp: Path
    proc: subprocess.Popen
    blockers: list[Blocker]
    read_end: int | None = None  # (a stuck stdout's)
    trigger: Callable[[Run], bool] | None = None
    began: float = 0.0
    stderr: str = ""
    killed_after: float = 0.0  # seconds from its start


def staged(tmp: Path) -> list[Path]:
    return [p for p in tmp.iterdir() if p.name.startswith(".hfbatch-stage-")] if tmp.exists() else []


def staged_size(tmp: Path) -> int:
    """The staging file's size (0: none yet); a Parquet file's header alone is 4 bytes."""
    try:
        return sum(p.stat().st_size for p in staged(tmp))
    except FileNotFoundError:
        return 0


def test_sigkill_at_any_point_leaves_day1_or_day2_and_a_rerun_converges(pg: Any, world: World,
                                                                         tmp_path: Path) -> None:
    """The day-2 run (over a day-1 table of 300 rows: 100 texts changed, 10 ids new, 10 gone,
    --delete-missing) as a process, SIGKILLed at ten points: while Python starts, at 1.5 s and
    3 s, once it has staged its first rows and more (the model at work), while it waits for the
    table's advisory lock (planning), at its merge (its rows COPYed into the temp table), at the
    record's upsert (the last statement before COMMIT), just after its COMMIT, and once it has
    cleaned up (its staging file gone, printing its report). Each time the table is day 1's or
    day 2's exactly (ids and hashes, no id twice; version 1 or 2: day 1 before the COMMIT, day 2
    after it), and a rerun gives day 2 at version 2.

    Each run has its own copy of day 1. The points are independent of each other and run at
    once, except the two that hold hfbatch_targets (every run's record upsert waits for it),
    which run one by one after them. The timed and staged points have caches of their own, so
    the model has work to do, and hold their table in SHARE mode, so a run faster than expected
    waits at its merge and never commits; the others find day 2's texts in the cache."""
    conn = pg.connect()

    def at_time(seconds: float) -> Callable[[Run], bool]:
        started = time.monotonic()
        return lambda r: time.monotonic() - started >= seconds

    def when_staged(r: Run) -> bool:
        return staged_size(r.tmp) > 4

    def when_staged_more() -> Callable[[Run], bool]:
        first: list[int] = []

        def trigger(r: Run) -> bool:
            size = staged_size(r.tmp)
            if size > 4 and not first:
                first.append(size)
            return bool(first) and size > first[0]
        return trigger

    def blocked(pattern: str | Callable[[str], str]) -> Callable[[Run], bool]:
        return lambda r: blocked_at(r.conn, pattern(r.table) if callable(pattern) else pattern) is not None

    def just_after_commit() -> Callable[[Run], bool]:
        """Blocked at the record (hfbatch_targets held), queue an ACCESS EXCLUSIVE lock on the
        table behind the run's transaction, let the record go: the COMMIT hands the table to
        the queued lock, and the run's next query of the table (its size) waits for it, its
        staging file not yet removed."""
        step: list[str] = []

        def trigger(r: Run) -> bool:
            if not step:
                if blocked_at(r.conn, RECORD) is None:
                    return False
                r.blockers.append(Blocker(r.pg, sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(ident(r.table)),
                                          wait=False))
                step.append("queued")
            queued = r.blockers[-1]
            if step[-1] == "queued":
                if queued.granted or not r.conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s AND "
                                                        "wait_event_type = 'Lock'", (queued.pid,)).fetchall():
                    return False
                assert version(r.conn, r.table) == 1
                r.blockers[0].release()  # (hfbatch_targets)
                step.append("released")
            if not queued.granted:
                return False
            assert queued.error is None, queued.error
            return version(r.conn, r.table) == 2 and blocked_at(r.conn, ".") is not None and bool(staged(r.tmp))
        return trigger

    def when_cleaned_up(r: Run) -> bool:
        return version(r.conn, r.table) == 2 and not staged(r.tmp)

    # (name, make its trigger, the locks held from its start, own cache (model work), stdout stuck, the day expected)
    together: list[tuple[str, Callable[[], Callable[[Run], bool]], Callable[[str], list[Any]], bool, bool, int]] = [
        ("first rows staged", lambda: when_staged, lambda t: [share(t)], True, False, 1),
        ("more rows staged", when_staged_more, lambda t: [share(t)], True, False, 1),
        ("starting", lambda: at_time(0.3), lambda t: [share(t)], True, False, 1),
        ("1.5 s in", lambda: at_time(1.5), lambda t: [share(t)], True, False, 1),
        ("3 s in", lambda: at_time(3.0), lambda t: [share(t)], True, False, 1),
        ("planning, waiting for the lock", lambda: lambda r: waiting_for_advisory(r.conn, r.table) is not None,
         lambda t: [advisory(t)], False, False, 1),
        ("merge, after the COPY", lambda: blocked(merge), lambda t: [share(t)], False, False, 1),
        ("cleaned up", lambda: when_cleaned_up, lambda t: [], False, True, 2),
    ]
    # (these two hold hfbatch_targets, which every run's record upsert needs: one by one)
    one_by_one: list[tuple[str, Callable[[], Callable[[Run], bool]], Callable[[str], list[Any]], bool, bool, int]] = [
        ("record update", lambda: blocked(RECORD), lambda t: [share_targets()], False, False, 1),
        ("just after commit", just_after_commit, lambda t: [share_targets()], False, False, 2),
    ]

    def launch(name: str, make: Callable[[], Callable[[Run], bool]], locks: Callable[[str], list[Any]],
               own_cache: bool, stuck: bool) -> Run:
        slug = re.sub(r"[^a-z0-9]+", "_", name).strip("_")
        table = copy_day1(conn, f"pgf_kill_{slug}")
        tmp = tmp_path / f"tmp-{slug}"
        blockers = [Blocker(pg, *(lock if isinstance(lock, tuple) else (lock,))) for lock in locks(table)]
        args = run_args(world, pg, table, tmp_path / f"cache-{slug}" if own_cache else world.cache)
        read_end = None
        if stuck:
            proc, read_end = start_stuck_stdout(args, sub_env(tmp), tmp_path)
        else:
            proc = start(args, sub_env(tmp), tmp_path)
        return Run(pg, conn, table, tmp, proc, blockers, read_end, make(), time.monotonic())

    def kill_all(runs: dict[str, Run]) -> None:
        """Each run SIGKILLed once its point comes (failing if one ends or times out first), then
        the locks let go (a killed run's backend, waiting on one, then finds its client gone and
        rolls back) and its backend gone."""
        pending = dict(runs)
        deadline = time.monotonic() + 90
        try:
            while pending:
                for name, r in list(pending.items()):
                    if r.trigger(r):  # type: ignore[misc]
                        r.proc.send_signal(signal.SIGKILL)
                        r.killed_after = round(time.monotonic() - r.began, 2)
                        del pending[name]
                    elif r.proc.poll() is not None:
                        _, err = r.proc.communicate()
                        pytest.fail(f"{name}: the run ended (exit {r.proc.returncode}) before its point: {err[-2000:]}")
                if pending and time.monotonic() > deadline:
                    pytest.fail(f"timed out waiting for {list(pending)}; hfbatch's sessions: {sessions(conn)}")
                time.sleep(0.002)
        finally:
            for r in runs.values():
                if r.proc.poll() is None:
                    r.proc.kill()  # (one whose point never came; a killed one: again, harmless)
                if r.read_end is not None:
                    r.stderr = r.proc.stderr.read()  # type: ignore[union-attr]
                    r.proc.wait(timeout=60)
                    os.close(r.read_end)
                else:
                    r.stderr = r.proc.communicate(timeout=60)[1]
                for blocker in r.blockers:
                    blocker.release()
        wait_no_sessions(conn)  # the killed runs' backends rolled back and went, their locks with them

    killed_at = []
    for group in [together, *([point] for point in one_by_one)]:
        runs = {name: launch(name, make, locks, own, stuck) for name, make, locks, own, stuck, _ in group}
        kill_all(runs)
        for name, *_, expected in group:
            r = runs[name]
            assert r.proc.returncode == -signal.SIGKILL, (name, r.proc.returncode, r.stderr[-2000:])
            # day 1 or day 2, exactly
            v = version(conn, r.table)
            now = state(conn, r.table)
            killed_at.append((name, r.proc.returncode, v, r.killed_after))
            assert v in (1, 2), (name, v)
            assert now == (world.day1 if v == 1 else world.day2), (name, v, len(set(now) ^ set(world.day2)))
            assert v == expected, (name, v, "the kill fell on the other side of the COMMIT than it should")

            # a rerun converges to day 2 (in-process: the model is loaded already)
            doc = embed(*run_args(world, pg, r.table, world.cache)[:-4])
            assert state(conn, r.table) == world.day2, name
            assert version(conn, r.table) == 2, (name, "one version for the day-2 change, whichever run made it")
            if v == 2:
                assert doc["metrics"]["texts_computed"] == 0, name
            wait_no_sessions(conn, r.table, timeout=5)  # the rerun let go of its connection and lock
    conn.close()
    # the points were kills, not runs that ended first, and some fell on each side of the commit
    assert all(code == -signal.SIGKILL for _, code, _, _ in killed_at), killed_at
    assert {v for _, _, v, _ in killed_at} == {1, 2}, killed_at


# --- 2. the connection lost (pg_terminate_backend) at three points --------------------------


@pytest.mark.parametrize("point", ["planning", "merge", "record"])
def test_a_lost_connection_rolls_back_with_one_line_and_a_rerun_converges(pg: Any, world: World, tmp_path: Path,
                                                                         point: str) -> None:
    """hfbatch's backend terminated by the server while it waits for the table's advisory lock,
    at its merge (rows COPYed into the temp table) and at the record's upsert: the run exits 1
    with one line (no traceback, no password), the table is day 1's exactly (version 1), and a
    rerun gives day 2."""
    conn = pg.connect()
    table = copy_day1(conn, f"pgf_lost_{point}")
    lock, waiting = {"planning": (advisory(table), lambda: waiting_for_advisory(conn, table)),
                     "merge": ((share(table),), lambda: blocked_at(conn, merge(table))),
                     "record": ((share_targets(),), lambda: blocked_at(conn, RECORD))}[point]
    blocker = Blocker(pg, *lock)
    proc = start(run_args(world, pg, table, world.cache), sub_env(tmp_path / "tmp"), tmp_path)
    try:
        pid = wait_until(proc, waiting, f"the run waiting at {point}", conn=conn)
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        blocker.release()
    line = one_line_error(proc, stderr, pg.password)
    assert pg.password not in stdout
    assert "Postgres failed while" in line and "run again" in line, line
    wait_no_sessions(conn, table)
    assert state(conn, table) == world.day1
    assert version(conn, table) == 1

    embed(*run_args(world, pg, table, world.cache)[:-4])
    assert state(conn, table) == world.day2
    assert version(conn, table) == 2
    wait_no_sessions(conn, table, timeout=5)
    conn.close()


# --- 3. two runs on one table at once ---------------------------------------------------------


def test_a_second_run_waits_for_the_first_and_plans_on_its_result(pg: Any, world: World, tmp_path: Path) -> None:
    """A (day 2) is stopped at its merge, holding the table's lock; B (k3) starts, says it
    waits, and waits; A commits (version 2), then B plans on A's table and commits (version 3):
    the table is exactly B's input (had B planned on day 1, A's new ids and A's texts that B
    has as on day 1 would be left: a mix)."""
    conn = pg.connect()
    table = copy_day1(conn, "pgf_serial")
    blocker = Blocker(pg, share(table))
    a = start(run_args(world, pg, table, world.cache), sub_env(tmp_path / "tmp-a"), tmp_path)
    b = None
    try:
        a_pid = wait_until(a, lambda: blocked_at(conn, merge(table)), "A at its merge", conn=conn)
        assert advisory_holders(conn, table) == [a_pid]
        b = start(run_args(world, pg, table, world.cache, world.k3), sub_env(tmp_path / "tmp-b"), tmp_path)
        wait_until(b, lambda: waiting_for_advisory(conn, table), "B waiting for A", conn=conn)
        assert version(conn, table) == 1
    finally:
        blocker.release()
    outs = [p.communicate(timeout=120) for p in (a, b)]
    for p, (out, err) in zip((a, b), outs):
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err and pg.password not in err + out
    docs = [json.loads(out)["provenance"]["output"]["table"] for out, _ in outs]
    assert [(d["version_before"], d["version"]) for d in docs] == [(1, 2), (2, 3)], docs
    assert WAITED in outs[1][1] and f"pid {a_pid}" in outs[1][1] and "waiting for it" in outs[1][1], outs[1][1]
    assert "the other run finished" in outs[1][1], outs[1][1]
    assert WAITED not in outs[0][1], outs[0][1]
    assert state(conn, table) == world.day3
    assert version(conn, table) == 3
    wait_no_sessions(conn, table, timeout=10)
    conn.close()


def test_two_runs_started_together_never_mix(pg: Any, world: World, tmp_path: Path) -> None:
    """A and B started at once, nothing held: both succeed, one after the other (versions 2
    and 3, the later planned on version 2), and the table is exactly the later one's input."""
    conn = pg.connect()
    table = copy_day1(conn, "pgf_race")
    procs = [start(run_args(world, pg, table, world.cache, src), sub_env(tmp_path / f"tmp-{k}"), tmp_path)
             for k, src in enumerate((world.k2, world.k3))]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    docs = [json.loads(out)["provenance"]["output"]["table"] for out, _ in outs]
    (first, _), (later, later_name) = sorted(zip(docs, "ab"), key=lambda dn: dn[0]["version"])
    assert (first["version_before"], first["version"], later["version_before"], later["version"]) == (1, 2, 2, 3), docs
    assert state(conn, table) == (world.day2 if later_name == "a" else world.day3)
    assert version(conn, table) == 3
    wait_no_sessions(conn, table, timeout=10)
    conn.close()


def test_lock_timeout_refuses_a_second_run_with_one_line_naming_the_first(pg: Any, world: World,
                                                                          tmp_path: Path) -> None:
    """A (day 2) is stopped at its merge holding the table; B with --lock-timeout 0 is refused at
    once, and with --lock-timeout 1 after waiting for a second: exit 1, one line naming A's
    session, nothing changed; then A commits and the table is exactly A's result."""
    conn = pg.connect()
    table = copy_day1(conn, "pgf_refused")
    blocker = Blocker(pg, share(table))
    a = start(run_args(world, pg, table, world.cache), sub_env(tmp_path / "tmp-a"), tmp_path)
    try:
        a_pid = wait_until(a, lambda: blocked_at(conn, merge(table)), "A at its merge", conn=conn)
        runs = {timeout: start(run_args(world, pg, table, world.cache, world.k3, "--lock-timeout", timeout),
                               sub_env(tmp_path / f"tmp-b{timeout}"), tmp_path) for timeout in ("0", "1")}
        b1_pid = wait_until(runs["1"], lambda: waiting_for_advisory(conn, table), "B waiting (--lock-timeout 1)", conn=conn)
        waiting = time.monotonic()
        lines = {}
        for timeout, b in runs.items():
            _, err = b.communicate(timeout=60)
            lines[timeout] = line = one_line_error(b, err, pg.password)
            assert WAITED in line and f"pid {a_pid}" in line and "gave up" in line, line
            if timeout == "0":
                assert err.strip() == line, err  # nothing but the refusal: it never waited
                assert "at once" in line, line
            else:
                assert "after 1 s" in line, line
                assert time.monotonic() - waiting < 5, "--lock-timeout 1 waited far longer than 1 s"
                assert WAITED in err.split(line)[0] and "waiting for it" in err, err  # it said it waits, first
        assert b1_pid != a_pid
        assert version(conn, table) == 1 and state(conn, table) == world.day1  # nothing changed
        assert a.poll() is None and blocked_at(conn, merge(table)) == a_pid  # A goes on holding the table
    finally:
        blocker.release()
    _, err = a.communicate(timeout=60)
    assert a.returncode == 0, err[-3000:]
    assert state(conn, table) == world.day2
    assert version(conn, table) == 2
    wait_no_sessions(conn, table, timeout=10)
    conn.close()
