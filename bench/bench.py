#!/usr/bin/env python3
"""wsusage benchmark: wsusage against the alternatives, on one throwaway cluster.

Variants run interleaved (A B C ... A B C ...) at each client count, so that machine drift hits
them alike; each is one statement over the same 100k-row `workspaces` table, prepared once per
connection and called with its id bound in binary by the benchmark's own client driver
(bench/driver), as an application's client library does it:

  floor          SELECT 1
  floor_id       SELECT $1 (the bound id), without marking
  floor_fn       SELECT floor_fn($1): a C function that takes the bound id and does nothing (contrib
                 isn's isn_weak(), which reads no argument, declared with the mark's): what
                 PostgreSQL spends on calling any extension function with the mark's argument
  mark           SELECT wsusage_mark($1), ids uniform over 100k
  mark_hot       the same over 10k hot ids
  mark_many      SELECT wsusage_mark_many($1), 100 ids per call     (reported as marks/s)
  update         UPDATE workspaces SET last_used_at = now() WHERE id = $1   (per heartbeat)
  staging        INSERT ... ON CONFLICT DO UPDATE into an UNLOGGED table, applied to workspaces by
                 a periodic statement at the same interval as wsusage's flush

Reported per variant and client count: marks/s, p50/p99 latency, WAL bytes per 1M marks
(including the flushes/applies and the VACUUM after each run), dead tuples created per 1M marks,
server CPU seconds per 1M marks. Then the close targets' own measurement: 20 sets of short runs
of wsusage_mark and its rivals back to back (SELECT 1 and floor_fn at 8 and 64 clients, staging
at 8), in a rotating order, one ratio per set (see alternated_sets). Then the flush itself: applying
1k/10k/100k pending ids with wsusage_flush() against one hand-written UPDATE ... FROM unnest(...)
of the same rows. Last, wsusage's own cost with no round trip around it (see in_server_cost): one
statement calls wsusage_mark, then floor_fn, on the same 1M ids, in 1 backend and then in as many
backends at once as the machine has cores; nanoseconds per call over floor_fn, of wall time and of
each backend's own CPU time. And what a client
that connects for every call sees (see connection_per_call): SELECT 1, floor_fn and wsusage_mark,
each call in a new backend, in alternated sets; calls/s and the first call's own latency.

Writes results/<stamp>.md, results/latest.md, results/latest.png (and .json).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROWS = 100_000
HOT = 10_000
PER_CALL = 100
# Workspace n's id; bench/driver/src/workload.rs binds the same (n in 12 hex digits at the end).
UUID_OF = "('00000000-0000-4000-8000-' || lpad(to_hex({n}), 12, '0'))::uuid"
VARIANTS = ["floor", "floor_id", "floor_fn", "mark", "mark_hot", "mark_many", "update", "staging"]

STAGING_APPLY = """
WITH d AS (DELETE FROM usage_staging RETURNING id, ts)
UPDATE workspaces AS w SET last_used_at = d.ts FROM d
 WHERE w.id = d.id AND (w.last_used_at IS NULL OR w.last_used_at < d.ts)
"""


def ids_query(n: int) -> str:
    """The ids of workspaces 1 to n, as a query (column `id`)."""
    return f"SELECT {UUID_OF.format(n='i')} AS id FROM generate_series(1, {n}) AS i"


def rotated(items: list, n: int) -> list:
    """`items` starting from its n-th (A B C, B C A, C A B, ...): the order of the n-th set of
    runs that take turns, so that no variant always runs first."""
    return items[n % len(items):] + items[:n % len(items)]


class Cluster:
    def __init__(self, bin_dir: Path, flush_interval_ms: int):
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="wsusage-bench-"))
        self.root = os.geteuid() == 0
        if self.root:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.as_owner([str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"])
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"""
listen_addresses = ''
port = 5432
unix_socket_directories = '{self.dir}'
max_connections = 200
shared_buffers = '256MB'
shared_preload_libraries = 'wsusage'
wsusage.flush_interval = '{flush_interval_ms}ms'
wsusage.max_pending = 524288
"""
            )
        self.as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "start"])

    def as_owner(self, argv):
        if self.root:
            argv = ["runuser", "-u", "postgres", "--"] + argv
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUST_")}
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)

    def sql(self, query: str) -> str:
        out = subprocess.run(
            [str(self.bin / "psql"), "-h", str(self.dir), "-U", "postgres", "-X", "-q", "-t", "-A",
             "-v", "ON_ERROR_STOP=1", "-c", query],
            capture_output=True, text=True,
        )
        if out.returncode != 0:
            raise RuntimeError(f"psql failed on {query!r}: {out.stderr.strip()}")
        return out.stdout.strip()

    def timed_sql(self, setup: str, query: str) -> float:
        """Milliseconds the server took for `query` (psql's \\timing), after `setup`."""
        script = f"{setup}\n\\timing on\n{query};\n"
        out = subprocess.run(
            [str(self.bin / "psql"), "-h", str(self.dir), "-U", "postgres", "-X", "-q", "-v", "ON_ERROR_STOP=1"],
            input=script, check=True, capture_output=True, text=True,
        )
        times = re.findall(r"Time: ([0-9.]+) ms", out.stdout)
        return float(times[-1])

    def server_cpu_seconds(self) -> float:
        """CPU of the postmaster and every server process, including those that have exited."""
        tick = os.sysconf("SC_CLK_TCK")
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        total = 0
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        for child in children:
            try:
                f = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(f[11]) + int(f[12])
            except OSError:
                # Exited since the list was read (ENOENT, or ESRCH while it is being reaped): its
                # time joins the postmaster's cutime/cstime once reaped.
                pass
        return total / tick

    def stop(self):
        self.as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(self.dir, ignore_errors=True)


def prepare(cluster: Cluster):
    cluster.sql("CREATE EXTENSION wsusage")
    # floor_fn: contrib isn's weak_input_status (SQL isn_weak()) returns a flag and reads no
    # argument, so declared with the mark's argument it is a C function passed the id, doing nothing.
    cluster.sql("CREATE FUNCTION floor_fn(uuid) RETURNS boolean AS '$libdir/isn', 'weak_input_status' LANGUAGE C VOLATILE")
    cluster.sql(
        "CREATE TABLE workspaces (id uuid PRIMARY KEY, name text, last_used_at timestamptz) WITH (fillfactor = 90)"
    )
    cluster.sql(
        f"INSERT INTO workspaces SELECT {UUID_OF.format(n='i')}, 'workspace ' || i, NULL FROM generate_series(1, {ROWS}) AS i"
    )
    # The same column as a named target, to measure what naming a target costs a mark (not in a
    # build before targets, 0.2.0, measured side by side with later ones).
    if cluster.sql("SELECT to_regclass('wsusage_target') IS NOT NULL") == "t":
        cluster.sql("INSERT INTO wsusage_target (name, relation, id_column, timestamp_column) "
                    "VALUES ('workspaces', 'workspaces', 'id', 'last_used_at')")
    cluster.sql("CREATE UNLOGGED TABLE usage_staging (id uuid PRIMARY KEY, ts timestamptz NOT NULL)")
    cluster.sql("VACUUM ANALYZE workspaces")
    cluster.sql("CHECKPOINT")


def write_counters(cluster: Cluster) -> int:
    return int(
        cluster.sql(
            "SELECT coalesce(sum(n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables "
            "WHERE relname IN ('workspaces', 'usage_staging')"
        )
    )


def settle(cluster: Cluster, variant: str):
    """Apply what the variant left pending and vacuum the dead tuples it made, so its WAL, dead
    tuples and CPU are counted in full, and the next variant does not pay for its autovacuum."""
    if variant.startswith("mark"):
        cluster.sql("SELECT wsusage_flush()")
        # The driver computes the ids it binds; every one must be a row of the table, or the
        # marks would measure nothing that lands.
        missing = int(cluster.sql("SELECT ids_without_row FROM wsusage_stats"))
        if missing:
            sys.exit(f"{missing} ids the driver marked have no row in workspaces: bench/driver and UUID_OF disagree")
    if variant == "staging":
        cluster.sql(STAGING_APPLY)
    if variant.startswith("mark") or variant in ("update", "staging"):
        cluster.sql("VACUUM workspaces, usage_staging")
    time.sleep(0.6)  # let backends' table statistics arrive (asynchronous before PostgreSQL 15)


def drive(cluster: Cluster, driver: Path, variant: str, clients: int, seconds: float, connect_per_call=False) -> dict:
    """One run of the driver: what it measured (calls, marks, rates, latencies)."""
    try:
        out = subprocess.run(
            [str(driver), "--socket", str(cluster.dir / ".s.PGSQL.5432"), "--variant", variant,
             "--clients", str(clients), "--seconds", str(seconds),
             "--rows", str(ROWS), "--hot", str(HOT), "--per-call", str(PER_CALL)]
            + (["--connect-per-call"] if connect_per_call else []),
            check=True, capture_output=True, text=True,
        )
    except subprocess.CalledProcessError as e:
        sys.exit(f"the driver failed on {variant} at {clients} clients: {e.stderr.strip()}")
    # A latency is null when no call completed.
    return {k: float("nan") if v is None else v for k, v in json.loads(out.stdout).items()}


# The targets whose bound lies within this machine's noise of what wsusage reaches are also
# measured on their own: at each client count, short runs of these variants back to back.
ALTERNATED = {8: ["floor", "floor_fn", "mark", "staging"], 64: ["floor", "floor_fn", "mark"]}
RIVAL_NAME = {"floor": "SELECT 1", "floor_fn": "floor_fn", "staging": "staging-table upsert"}


def alternated_sets(cluster: Cluster, driver: Path, clients_list, variants, sets: int, seconds: float, interval_s: float):
    """Short runs of `wsusage_mark` and its rivals back to back, the order rotating from one set
    to the next (A B C, B C A, C A B, ...), one ratio per set. On a shared machine two adjacent
    12 s windows of equal-cost statements differ by up to 15%, which decides a round's ratio;
    seconds apart and many times over, that noise averages out instead."""
    rows = []
    if sets < 1:  # --sets 0: the rounds alone judge every target
        return rows
    for c, members in ALTERNATED.items():
        members = [v for v in members if v in variants]
        if c not in clients_list or "mark" not in members or len(members) < 2:
            continue
        for n in range(sets):
            rate = {v: run_variant(cluster, driver, v, c, seconds, interval_s)["marks_per_s"] for v in rotated(members, n)}
            rows.append({"clients": c, "set": n + 1, **rate})
        for rival in members:
            if rival != "mark":
                print(f"sets at {c:>3} clients: mark / {RIVAL_NAME[rival]} median "
                      f"{set_median(rows, 'mark', rival, c):.3f} over {sets} sets", flush=True)
    return rows


def set_ratios(set_rows, a, b, clients):
    """a's marks/s over b's in each alternated set at `clients` that ran both."""
    return sorted(r[a] / r[b] for r in set_rows if r["clients"] == clients and r.get(a) and r.get(b))


def set_median(set_rows, a, b, clients):
    ratios = set_ratios(set_rows, a, b, clients)
    return statistics.median(ratios) if ratios else None


def best_ratio(results, set_rows, a, b, clients):
    """a's marks/s over b's at `clients`: the alternated sets' median where they ran both, else
    the rounds' (paired_ratio); and whether it came from the sets."""
    alternated = set_median(set_rows, a, b, clients)
    if alternated is not None:
        return alternated, True
    return paired_ratio(results, (a, clients), (b, clients)), False


def run_variant(cluster: Cluster, driver: Path, variant: str, clients: int, seconds: float, interval_s: float):
    stop = threading.Event()
    applier = None
    if variant == "staging":
        def apply_loop():
            while not stop.wait(interval_s):
                cluster.sql(STAGING_APPLY)
        applier = threading.Thread(target=apply_loop)
        applier.start()

    wal_before = cluster.sql("SELECT pg_current_wal_lsn()")
    writes_before = write_counters(cluster)
    cpu_before = cluster.server_cpu_seconds()
    try:
        measured = drive(cluster, driver, variant, clients, seconds)
    finally:
        stop.set()
        if applier:
            applier.join()
    settle(cluster, variant)
    cpu = cluster.server_cpu_seconds() - cpu_before
    wal = int(cluster.sql(f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{wal_before}')"))
    writes = write_counters(cluster) - writes_before

    marks = measured["marks"]
    per_million = 1_000_000 / marks if marks else 0
    return {
        "variant": variant, "clients": clients, "tps": measured["calls_per_s"], "marks_per_s": measured["marks_per_s"],
        "p50_ms": measured["p50_ms"], "p99_ms": measured["p99_ms"], "marks": marks,
        "wal_bytes_per_1m": wal * per_million, "dead_tuples_per_1m": writes * per_million,
        "cpu_s_per_1m": cpu * per_million,
    }


def flush_benchmark(cluster: Cluster, sizes, repeats):
    # Only wsusage_flush() may flush now, or the worker's own tick would take the ids first.
    cluster.sql("ALTER SYSTEM SET wsusage.flush_interval = '1h'")
    cluster.sql("SELECT pg_reload_conf()")
    time.sleep(0.5)
    rows = []
    for n in sizes:
        ids_sql = ids_query(n)
        def reset():
            for statement in ["UPDATE workspaces SET last_used_at = NULL WHERE last_used_at IS NOT NULL",
                              "VACUUM workspaces", "CHECKPOINT"]:
                cluster.sql(statement)
        ours, theirs = [], []
        for _ in range(repeats):
            reset()
            cluster.sql(f"SELECT wsusage_mark_many(ARRAY({ids_sql}))")
            ours.append(cluster.timed_sql("", "SELECT wsusage_flush()"))
            reset()
            setup = (
                f"CREATE TEMP TABLE batch AS SELECT array_agg(id) AS ids, array_agg(clock_timestamp()) AS ts FROM ({ids_sql}) s;"
            )
            theirs.append(cluster.timed_sql(
                setup,
                "UPDATE workspaces AS t SET last_used_at = v.ts FROM unnest((SELECT ids FROM batch), (SELECT ts FROM batch)) "
                "AS v(id, ts) WHERE t.id = v.id AND (t.last_used_at IS NULL OR t.last_used_at < v.ts)",
            ))
        rows.append({"ids": n, "wsusage_ms": statistics.median(ours), "unnest_ms": statistics.median(theirs)})
    return rows


CONNECTING = ["floor", "floor_fn", "mark"]


def connection_per_call(cluster: Cluster, driver: Path, clients: int, sets: int, seconds: float):
    """What a client that opens a connection for every call sees (PHP without persistent
    connections, serverless functions, cron scripts, pools that recycle connections): each call
    is a new backend's first, so a mark's first-call work (resolving its target) is paid every
    time. `clients` threads connect, prepare, call once and disconnect, for `seconds`, for
    SELECT 1, floor_fn and wsusage_mark back to back, the order rotating from one set to the next.
    Per set and variant: calls/s, and the median of the first call's own latency (Parse, then
    Bind/Execute, in the new backend; the connection's own time apart)."""
    rows = []
    for n in range(sets):
        row = {"clients": clients, "set": n + 1}
        for v in rotated(CONNECTING, n):
            measured = drive(cluster, driver, v, clients, seconds, connect_per_call=True)
            row[v] = measured["calls_per_s"]
            row[f"{v}_first_ms"] = measured["first_call_p50_ms"]
        rows.append(row)
    if rows:
        print(f"a connection per call at {clients} clients: mark / SELECT 1 median "
              f"{statistics.median(r['mark'] / r['floor'] for r in rows):.3f}, first mark / first floor_fn call "
              f"{statistics.median(r['mark_first_ms'] / r['floor_fn_first_ms'] for r in rows):.3f} over {sets} sets", flush=True)
    return rows


def connecting_ratios(connect_rows, a, b):
    """a / b within each set of connection_per_call (a, b: its keys), sorted."""
    return sorted(r[a] / r[b] for r in connect_rows if r.get(a) and r.get(b))


def summarise(results):
    """Median over rounds of each (variant, clients)."""
    groups = {}
    for r in results:
        groups.setdefault((r["variant"], r["clients"]), []).append(r)
    out = []
    for (variant, clients), rs in groups.items():
        row = {"variant": variant, "clients": clients}
        for key in ["marks_per_s", "p50_ms", "p99_ms", "wal_bytes_per_1m", "dead_tuples_per_1m", "cpu_s_per_1m"]:
            row[key] = statistics.median(r[key] for r in rs)
        out.append(row)
    return out


def paired_ratio(results, a, b, key="marks_per_s"):
    """Median over rounds of variant a's value / variant b's value in the same round, a and b
    being (variant, clients): the two ran minutes apart at most, so the machine's drift over the
    whole run cancels out."""
    def per_round(variant, clients):
        return {r["round"]: r[key] for r in results if r["variant"] == variant and r["clients"] == clients}
    va, vb = per_round(*a), per_round(*b)
    ratios = [va[n] / vb[n] for n in va if n in vb and vb[n]]
    return statistics.median(ratios) if ratios else None


def targets(results, flush_rows, clients_list, set_rows, connect_rows=()):
    def ratio_of(a, b, key="marks_per_s"):
        return paired_ratio(results, a, b, key)

    checks = []
    def check(name, ratio, bound, higher_is_better=True):
        if ratio is None:
            return
        met = ratio >= bound if higher_is_better else ratio <= bound
        checks.append((name, ratio, ("≥ " if higher_is_better else "≤ ") + f"{bound:g}", met))

    def check_against(rival, c, bound):
        value, from_sets = best_ratio(results, set_rows, "mark", rival, c)
        check(f"mark / {RIVAL_NAME[rival]} at {c} clients" + (" (alternated sets)" if from_sets else ""), value, bound)

    check_against("floor", 8, 0.90)
    check_against("floor", 64, 0.90)
    if 8 in clients_list:
        check("mark / per-heartbeat UPDATE at 8 clients", ratio_of(("mark", 8), ("update", 8)), 10)
    check_against("staging", 8, 2)
    if 8 in clients_list:
        check("WAL per 1M marks, hot ids: mark_hot / UPDATE at 8 clients",
              ratio_of(("mark_hot", 8), ("update", 8), "wal_bytes_per_1m"), 0.01, False)
    if 8 in clients_list and 64 in clients_list:
        check("mark at 64 clients / at 8 clients", ratio_of(("mark", 64), ("mark", 8)), 0.8)
    big = [r for r in flush_rows if r["ids"] == max(x["ids"] for x in flush_rows)] if flush_rows else []
    if big:
        check(f"flush of {big[0]['ids']} ids / hand-written UPDATE ... FROM unnest", ratio(big[0]["wsusage_ms"], big[0]["unnest_ms"]), 1.2, False)
    if len(flush_rows) >= 2:
        small, large = flush_rows[0], flush_rows[-1]
        per_small = small["wsusage_ms"] / small["ids"]
        per_large = large["wsusage_ms"] / large["ids"]
        check(f"flush time per id, {large['ids']} / {small['ids']} ids (linear: ≈ 1 or less)", ratio(per_large, per_small), 1.5, False)
    if connect_rows:
        c = connect_rows[0]["clients"]
        check(f"a connection per call: mark / SELECT 1 at {c} clients (alternated sets)",
              statistics.median(connecting_ratios(connect_rows, "mark", "floor")), 0.9)
        check("a new backend's first mark / its first floor_fn call (p50 latency, alternated sets)",
              statistics.median(connecting_ratios(connect_rows, "mark_first_ms", "floor_fn_first_ms")), 2, False)
    return checks


def ratio(a, b):
    return a / b if a is not None and b else None


def context(results, clients_list, set_rows):
    """Ratios that are no targets but say what the targets' ratios are made of (from the
    alternated sets where they ran, else from the rounds)."""
    rows = []
    for c in clients_list:
        rows.append((f"floor_fn / SELECT 1 at {c} clients: PostgreSQL's cost of calling an extension function "
                     "with the mark's argument", best_ratio(results, set_rows, "floor_fn", "floor", c)[0]))
        rows.append((f"mark / floor_fn at {c} clients: what wsusage itself costs",
                     best_ratio(results, set_rows, "mark", "floor_fn", c)[0]))
    if 8 in clients_list:
        rows.append(("SELECT 1 / per-heartbeat UPDATE at 8 clients: the most any call of one round trip reaches "
                     "against the UPDATE on this machine", paired_ratio(results, ("floor", 8), ("update", 8))))
    if 8 in clients_list and 64 in clients_list:
        rows.append(("SELECT 1 at 64 clients / at 8 clients: how this machine itself scales",
                     paired_ratio(results, ("floor", 64), ("floor", 8))))
        rows.append(("floor_fn at 64 clients / at 8 clients: how any extension function's call scales",
                     paired_ratio(results, ("floor_fn", 64), ("floor_fn", 8))))
    return [(name, value) for name, value in rows if value is not None]


IN_SERVER = ["scan", "floor_fn", "mark", "mark_target", "read"]


class Session:
    """One psql session kept open, so that its backend's own CPU time can be read around a
    statement: on a 2-core machine, two backends and the harness share the cores, and a
    statement's wall time counts the moments its backend waited for one; its CPU time (the
    kernel's run-time account of the backend, /proc/PID/schedstat) counts only the work, and a
    mark's cost to the other backend (a cache line taken away) is still in it."""

    def __init__(self, cluster: Cluster, setup: str):
        self.psql = subprocess.Popen(
            [str(cluster.bin / "psql"), "-h", str(cluster.dir), "-U", "postgres", "-X", "-q", "-A", "-t",
             "-v", "ON_ERROR_STOP=1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = int(self.ask(f"{setup};\nSELECT pg_backend_pid()"))
        self.ask("\\timing on\nSELECT 1")
        self.psql.stdout.readline()  # SELECT 1's timing

    def ask(self, statements: str) -> str:
        """Run `statements`, the last of which returns one line, and return that line."""
        self.psql.stdin.write(statements + ";\n")
        self.psql.stdin.flush()
        line = self.psql.stdout.readline()
        if not line:
            raise RuntimeError(f"psql ended on {statements!r}")
        return line.strip()

    def cpu_ns(self) -> int:
        return int(Path(f"/proc/{self.pid}/schedstat").read_text().split()[0])

    def timed(self, query: str):
        """(wall ms as psql's \\timing has it, CPU ns of the backend) of `query`, which returns one row."""
        before = self.cpu_ns()
        self.ask(query)
        timing = self.psql.stdout.readline()
        after = self.cpu_ns()
        found = re.match(r"Time: ([0-9.]+) ms", timing)
        if not found:
            raise RuntimeError(f"no timing after {query!r}: {timing!r}")
        return float(found.group(1)), after - before

    def close(self):
        self.psql.stdin.close()
        self.psql.wait()


def in_server_cost(cluster: Cluster, calls: int, backends_list, reps: int):
    """What a mark costs inside the server, without the round trip whose noise hides it in
    marks/s: `SELECT count(f(id)) FROM draws` over `calls` ids drawn uniformly from the 100k, all
    of them pending (a mark of a pending id, the steady state between flushes), for f = nothing
    (the bare scan), floor_fn and wsusage_mark, in a rotating order, `reps` times; the same
    statement in `backends` sessions at once shows what marking backends cost one another.
    Returns per backend count the median milliseconds of each, and ns per call over the bare scan
    (floor_fn) and over floor_fn (the mark), of wall time and of each backend's own CPU time (see
    Session: the figure that compares builds, the wall time varying with what else ran). mark_target is `wsusage_mark('workspaces', id)`, the
    same column as a named target: what naming one costs. read is `wsusage_pending_at(id)`, a
    fresh read of the pending mark of each id (all found), in builds that have it. Run after
    flush_benchmark: its hour-long flush interval keeps the worker from emptying the set meanwhile."""
    named = cluster.sql("SELECT to_regclass('wsusage_target') IS NOT NULL") == "t"
    reads = cluster.sql("SELECT to_regprocedure('wsusage_pending_at(uuid)') IS NOT NULL") == "t"
    measured = [m for m in IN_SERVER if (named or m != "mark_target") and (reads or m != "read")]
    cluster.sql(f"SELECT wsusage_mark_many(ARRAY({ids_query(ROWS)}))")
    if named:
        cluster.sql(f"SELECT wsusage_mark_many('workspaces', ARRAY({ids_query(ROWS)}))")
    cluster.sql(f"CREATE TABLE draws AS SELECT {UUID_OF.format(n=f'1 + (random() * {ROWS - 1})::int')} AS id "
                f"FROM generate_series(1, {calls})")
    cluster.sql("VACUUM ANALYZE draws")
    query = {"scan": "SELECT count(id) FROM draws", "floor_fn": "SELECT count(floor_fn(id)) FROM draws",
             "mark": "SELECT count(wsusage_mark(id)) FROM draws",
             "mark_target": "SELECT count(wsusage_mark('workspaces', id)) FROM draws",
             "read": "SELECT count(wsusage_pending_at(id)) FROM draws"}
    rows = []
    for backends in backends_list:
        sessions = [Session(cluster, "SET max_parallel_workers_per_gather = 0") for _ in range(backends)]
        times = {m: [] for m in measured}
        cpu = {m: [] for m in measured}
        try:
            for rep in range(reps):
                for m in rotated(measured, rep):
                    took = [(0.0, 0)] * backends
                    def run(i, m=m, took=took):
                        took[i] = sessions[i].timed(query[m])
                    threads = [threading.Thread(target=run, args=(i,)) for i in range(backends)]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    times[m].append(statistics.mean(ms for ms, _ in took))
                    cpu[m].append(statistics.mean(ns for _, ns in took))
        finally:
            for session in sessions:
                session.close()
        ms = {m: statistics.median(times[m]) for m in measured}
        cpu_ns = {m: statistics.median(cpu[m]) / calls for m in measured}
        rows.append({"backends": backends, "calls": calls, "reps": reps, "ms": ms,
                     "floor_fn_ns": (ms["floor_fn"] - ms["scan"]) * 1e6 / calls,
                     "mark_ns": (ms["mark"] - ms["floor_fn"]) * 1e6 / calls,
                     "mark_target_ns": (ms["mark_target"] - ms["floor_fn"]) * 1e6 / calls if named else None,
                     "mark_ns_range": [(t - ms["floor_fn"]) * 1e6 / calls for t in (min(times["mark"]), max(times["mark"]))],
                     "cpu_ns": cpu_ns,
                     "mark_cpu_ns": cpu_ns["mark"] - cpu_ns["floor_fn"],
                     "mark_target_cpu_ns": cpu_ns["mark_target"] - cpu_ns["floor_fn"] if named else None,
                     "mark_cpu_ns_range": [t / calls - cpu_ns["floor_fn"] for t in (min(cpu["mark"]), max(cpu["mark"]))],
                     "read_ns": (ms["read"] - ms["floor_fn"]) * 1e6 / calls if reads else None,
                     "read_cpu_ns": cpu_ns["read"] - cpu_ns["floor_fn"] if reads else None})
    return rows


def markdown(summary, flush_rows, checks, notes, meta, set_rows, in_server_rows, connect_rows=()):
    lines = [f"# wsusage benchmark — {meta['stamp']}", "",
             f"Machine: {meta['machine']}. PostgreSQL {meta['pg']}, wsusage {meta['build']} build, "
             f"synchronous_commit on, {ROWS:,} workspaces, {meta['seconds']} s per run, {meta['rounds']} interleaved rounds "
             f"(medians), flush interval {meta['interval_ms']} ms.", "",
             "| variant | clients | marks/s | p50 ms | p99 ms | WAL bytes / 1M marks | dead tuples / 1M marks | server CPU s / 1M marks |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(summary, key=lambda r: (r["clients"], VARIANTS.index(r["variant"]))):
        lines.append(f"| {r['variant']} | {r['clients']} | {r['marks_per_s']:,.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                     f"{r['wal_bytes_per_1m']:,.0f} | {r['dead_tuples_per_1m']:,.0f} | {r['cpu_s_per_1m']:.1f} |")
    if flush_rows:
        lines += ["", "Flush of pending ids (median ms):", "", "| ids | wsusage_flush() | hand-written UPDATE … FROM unnest | ratio |", "|---:|---:|---:|---:|"]
        for r in flush_rows:
            lines.append(f"| {r['ids']:,} | {r['wsusage_ms']:.1f} | {r['unnest_ms']:.1f} | {r['wsusage_ms'] / r['unnest_ms']:.2f} |")
    if set_rows:
        lines += ["", f"Alternated sets: `wsusage_mark` and its rivals for {meta['set_seconds']} s each, back to back, "
                  "the order rotating from one set to the next; the ratio of marks/s within each set:", "",
                  "| ratio | clients | sets | median | quartiles | lowest | highest |", "|---|---:|---:|---:|---|---:|---:|"]
        for c, members in ALTERNATED.items():
            for a, b in [("mark", rival) for rival in members if rival != "mark"] + [("floor_fn", "floor")]:
                ratios = set_ratios(set_rows, a, b, c)
                if not ratios:
                    continue
                q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) >= 2 else [ratios[0]] * 3
                lines.append(f"| {RIVAL_NAME.get(a, a)} / {RIVAL_NAME[b]} | {c} | {len(ratios)} | {statistics.median(ratios):.3f} | "
                             f"{q[0]:.3f} – {q[2]:.3f} | {ratios[0]:.3f} | {ratios[-1]:.3f} |")
    if in_server_rows:
        r0 = in_server_rows[0]
        lines += ["", f"Inside the server, no round trip: `SELECT count(f(id))` over {r0['calls']:,} ids, all pending, "
                  f"the same statement in each backend at once, median of {r0['reps']} (ms per statement; ns per call):", "",
                  "| backends at once | bare scan ms | floor_fn ms | wsusage_mark ms | floor_fn over the scan, ns/call | "
                  "wsusage_mark over floor_fn, ns/call (fastest – slowest run) | wsusage_mark('workspaces', id) over floor_fn, "
                  "ns/call | named / unnamed |", "|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in in_server_rows:
            lo, hi = r["mark_ns_range"]
            lines.append(f"| {r['backends']} | {r['ms']['scan']:.1f} | {r['ms']['floor_fn']:.1f} | {r['ms']['mark']:.1f} | "
                         f"{r['floor_fn_ns']:.0f} | {r['mark_ns']:.0f} ({lo:.0f} – {hi:.0f}) | "
                         + (f"{r['mark_target_ns']:.0f} | {r['mark_target_ns'] / r['mark_ns'] if r['mark_ns'] > 0 else float('nan'):.2f} |"
                            if r["mark_target_ns"] is not None else "– | – |"))
        lines += ["", "The same statements in each backend's own CPU time (the kernel's account of it: what a mark costs, "
                  "without the moments a backend waited for a core), ns per call:", "",
                  "| backends at once | floor_fn (with the scan) | wsusage_mark over floor_fn (fastest – slowest run) | "
                  "wsusage_mark('workspaces', id) over floor_fn | wsusage_pending_at(id) over floor_fn |",
                  "|---:|---:|---|---:|---:|"]
        for r in in_server_rows:
            lo, hi = r["mark_cpu_ns_range"]
            named, read = r["mark_target_cpu_ns"], r.get("read_cpu_ns")
            lines.append(f"| {r['backends']} | {r['cpu_ns']['floor_fn']:.0f} | {r['mark_cpu_ns']:.0f} ({lo:.0f} – {hi:.0f}) | "
                         + (f"{named:.0f} | " if named is not None else "– | ")
                         + (f"{read:.0f} |" if read is not None else "– |"))
    if connect_rows:
        c, n = connect_rows[0]["clients"], len(connect_rows)
        lines += ["", f"A connection per call: {c} clients each connecting, preparing, calling once and disconnecting, "
                  f"for {meta['connect_seconds']} s a variant, {n} sets, the order rotating; medians over the sets "
                  "(first call: Parse, then Bind/Execute, in the new backend, p50 of the set):", "",
                  "| variant | calls/s | / `SELECT 1` (quartiles) | first call ms | first call / `floor_fn`'s (quartiles) |",
                  "|---|---:|---|---:|---|"]
        def quartiles(ratios):
            q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) >= 2 else [ratios[0]] * 3
            return f"{statistics.median(ratios):.3f} ({q[0]:.3f} – {q[2]:.3f})"
        for v in CONNECTING:
            lines.append(f"| {v} | {statistics.median(r[v] for r in connect_rows):,.0f} | "
                         f"{quartiles(connecting_ratios(connect_rows, v, 'floor'))} | "
                         f"{statistics.median(r[v + '_first_ms'] for r in connect_rows):.3f} | "
                         f"{quartiles(connecting_ratios(connect_rows, v + '_first_ms', 'floor_fn_first_ms'))} |")
    lines += ["", "Targets:", "", "A ratio of two variants is the median over rounds of their ratio within each round "
              "(a target marked “alternated sets”: the median over those sets).", "",
              "| target | measured | bound | met |", "|---|---:|---:|---|"]
    for name, value, bound, met in checks:
        lines.append(f"| {name} | {value:.4g} | {bound} | {'yes' if met else '**no**'} |")
    if notes:
        lines += ["", "What the ratios are made of (no targets):", "", "| ratio | measured |", "|---|---:|"]
        lines += [f"| {name} | {value:.4g} |" for name, value in notes]
    return "\n".join(lines) + "\n"


def plot(summary, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in VARIANTS if any(r["variant"] == v for r in summary)]
    clients = sorted({r["clients"] for r in summary})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / len(clients)
    for i, c in enumerate(clients):
        vals = [next((r["marks_per_s"] for r in summary if r["variant"] == v and r["clients"] == c), 0) for v in variants]
        ax1.bar([x + i * width for x in range(len(variants))], vals, width, label=f"{c} clients")
        wal = [max(1, next((r["wal_bytes_per_1m"] for r in summary if r["variant"] == v and r["clients"] == c), 1)) for v in variants]
        ax2.bar([x + i * width for x in range(len(variants))], wal, width, label=f"{c} clients")
    for ax in (ax1, ax2):
        ax.set_xticks([x + width * (len(clients) - 1) / 2 for x in range(len(variants))], variants, rotation=20)
        ax.legend()
    ax1.set_yscale("log")
    ax1.set_ylabel("marks per second (log)")
    ax1.set_title("Throughput (higher is better)")
    ax2.set_yscale("log")
    ax2.set_ylabel("WAL bytes per 1M marks (log)")
    ax2.set_title("Write cost (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True, help="bin/ directory of the PostgreSQL build")
    p.add_argument("--driver", required=True, help="the built bench/driver binary (wsusage-bench-driver)")
    p.add_argument("--seconds", type=float, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sets", type=int, default=20, help="alternated sets of short runs per client count (see ALTERNATED)")
    p.add_argument("--set-seconds", type=float, default=3)
    p.add_argument("--clients", default="1,8,64")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--flush-sizes", default="1000,10000,100000")
    p.add_argument("--flush-repeats", type=int, default=5)
    p.add_argument("--in-server-calls", type=int, default=1_000_000, help="ids per statement of in_server_cost (0: skip it)")
    p.add_argument("--in-server-reps", type=int, default=7)
    p.add_argument("--connect-sets", type=int, default=10, help="sets of connection_per_call (0: skip it)")
    p.add_argument("--connect-seconds", type=float, default=3)
    p.add_argument("--connect-clients", type=int, default=8)
    p.add_argument("--interval-ms", type=int, default=60000, help="wsusage.flush_interval and the staging apply interval")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--build", default="release")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--replot", metavar="JSON", help="only redraw the plot of a results JSON, next to it")
    args = p.parse_args()
    if args.replot:
        data = json.loads(Path(args.replot).read_text())
        plot(data["summary"], Path(args.replot).with_suffix(".png"))
        return

    clients_list = [int(c) for c in args.clients.split(",")]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    cluster = Cluster(Path(args.bin), args.interval_ms)
    try:
        prepare(cluster)
        pg = cluster.sql("SHOW server_version")
        results = []
        for rnd in range(args.rounds):
            for c in clients_list:
                for v in variants:
                    r = run_variant(cluster, Path(args.driver), v, c, args.seconds, args.interval_ms / 1000)
                    r["round"] = rnd + 1
                    print(f"round {rnd + 1} {v:>9} {c:>3} clients: {r['marks_per_s']:>10,.0f} marks/s  p99 {r['p99_ms']:.3f} ms  "
                          f"WAL/1M {r['wal_bytes_per_1m']:>14,.0f}  dead/1M {r['dead_tuples_per_1m']:>10,.0f}", flush=True)
                    results.append(r)
        set_rows = alternated_sets(cluster, Path(args.driver), clients_list, variants, args.sets, args.set_seconds,
                                   args.interval_ms / 1000)
        sizes = [int(s) for s in args.flush_sizes.split(",") if s]
        flush_rows = flush_benchmark(cluster, sizes, args.flush_repeats)
        for r in flush_rows:
            print(f"flush {r['ids']:>7} ids: wsusage {r['wsusage_ms']:.1f} ms, hand-written {r['unnest_ms']:.1f} ms", flush=True)
        connect_rows = connection_per_call(cluster, Path(args.driver), args.connect_clients, args.connect_sets,
                                           args.connect_seconds)
        in_server_rows = []
        if args.in_server_calls > 0:
            in_server_rows = in_server_cost(cluster, args.in_server_calls, sorted({1, os.cpu_count() or 1}), args.in_server_reps)
        for r in in_server_rows:
            print(f"in the server, {r['backends']} backend(s) at once: wsusage_mark {r['mark_ns']:.0f} ns per call over floor_fn, "
                  f"{r['mark_cpu_ns']:.0f} ns of the backend's CPU"
                  + (f"; wsusage_pending_at {r['read_cpu_ns']:.0f} ns of CPU over floor_fn" if r.get("read_cpu_ns") is not None else ""),
                  flush=True)
    finally:
        cluster.stop()

    summary = summarise(results)
    checks = targets(results, flush_rows, clients_list, set_rows, connect_rows)
    stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
    meta = {"stamp": stamp, "machine": f"{os.cpu_count()} cores ({cpu}), {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB",
            "pg": pg, "build": args.build, "seconds": args.seconds, "rounds": args.rounds, "interval_ms": args.interval_ms,
            "sets": args.sets, "set_seconds": args.set_seconds, "connect_seconds": args.connect_seconds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(summary, flush_rows, checks, context(results, clients_list, set_rows), meta, set_rows, in_server_rows,
                  connect_rows)
    (out / f"{stamp}.md").write_text(md)
    (out / "latest.md").write_text(md)
    (out / "latest.json").write_text(json.dumps({"meta": meta, "runs": results, "summary": summary, "flush": flush_rows, "sets": set_rows,
                                                    "in_server": in_server_rows, "connect": connect_rows}, indent=1))
    if not args.no_plot:
        plot(summary, out / "latest.png")
    print(md)


if __name__ == "__main__":
    main()
