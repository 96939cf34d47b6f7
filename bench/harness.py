"""The benchmark harness: the same workloads with medallion and with its peers, measured in one run.

Called by bench/run.sh (which builds the binaries and installs the peers); `bench/run.sh --help` lists
the options. Workloads, in the order they run for each engine:

  ingest       full load of N transactions (CSV) into Bronze + Silver
  gold         the full Gold build (daily_kpis, merchant_daily, fact_transactions) from that Silver
  incremental  a change batch of N/10 (half updates of keys over all dates, 1% deletes, the rest
               inserts) into Bronze, merged into Silver, Gold rebuilt for the touched dates; --batch
               sets its size, --batch-days keeps its updates and deletes to keys of the last days
  capped       the same incremental run from the same starting state, inside a memory cgroup
  pipeline     ingest + gold in one run from an empty lake (the whole job as a user schedules it)

The floor (arrow-rs CSV -> Parquet, nothing else) runs once, next to ingest. Every engine's tables are
checked against medallion's after gold and after incremental (row counts and exact sums); a peer whose
output differs is marked and its times do not count.

With --repeat N the whole run is made N times in rounds: each round runs the floor and then every
engine, so a slow spell of the machine falls on all of them. The table gives each engine's median, the
range over rounds, and the ratio of medians with the range of the rounds' own ratios; peak RSS is the
largest of the rounds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / "peers"
ENGINES = ["medallion", "medallion-dv", "deltalake", "polars", "duckdb", "spark"]
# medallion-dv: medallion with the reference pipeline's Silver created with deletion vectors
# (`deletion_vectors: true`), so that a batch marks the rows it changes instead of rewriting files,
# and the fact refreshed by key with them (`incremental.key`).
# Not in the default run: its Silver is not readable by Python deltalake's pyarrow reader.
DEFAULT_ENGINES = [e for e in ENGINES if e != "medallion-dv"]
WORKLOADS = ["ingest", "gold", "incremental", "capped", "pipeline"]
CGROUP = Path("/sys/fs/cgroup/memory")


def parse_scale(text: str) -> int:
    text = text.strip().lower().replace("_", "")
    for suffix, factor in (("k", 1_000), ("m", 1_000_000)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def parse_bytes(text: str) -> int:
    text = text.strip().upper().rstrip("B").rstrip("I")
    for suffix, factor in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if text.endswith(suffix):
            return int(float(text[:-1]) * factor)
    return int(text)


def human(n: int) -> str:
    for unit, size in (("m", 1_000_000), ("k", 1_000)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


@dataclass
class Measure:
    engine: str
    workload: str
    rows: int
    wall: float = 0.0
    cpu: float = 0.0
    kernel: float = 0.0  # the part of `cpu` spent in the kernel (page faults, zeroing, copies)
    peak_rss: int = 0  # bytes
    files: int = 0
    bytes_written: int = 0
    ok: bool = True
    note: str = ""
    check: str = ""  # "same" | "DIFFERS: ..." | "" (not checked)
    round: int = 1

    @property
    def counts(self) -> bool:
        return self.ok and not self.check.startswith("DIFFERS")


@dataclass
class Tree:
    """Peak RSS and CPU of a process and all its descendants, sampled from /proc."""

    root: int
    peak: int = 0
    cpu: dict[int, float] = field(default_factory=dict)
    kernel: dict[int, float] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        page = os.sysconf("SC_PAGE_SIZE")
        while not self.done.is_set():
            parents: dict[int, int] = {}
            stats: dict[int, list[str]] = {}
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        fields = handle.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parents[int(entry)] = int(fields[1])
                stats[int(entry)] = fields
            members = {self.root}
            changed = True
            while changed:
                changed = False
                for pid, parent in parents.items():
                    if parent in members and pid not in members:
                        members.add(pid)
                        changed = True
            rss = 0
            for pid in members:
                fields = stats.get(pid)
                if fields is None:
                    continue
                rss += int(fields[21]) * page
                self.cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
                self.kernel[pid] = int(fields[12]) / tick
            self.peak = max(self.peak, rss)
            self.done.wait(0.05)


class Cgroup:
    """A memory cgroup (v1) that caps what a command may use; None when this machine does not allow it."""

    def __init__(self, limit: int):
        self.path = CGROUP / f"medallion-bench-{os.getpid()}"
        self.path.mkdir(exist_ok=True)
        (self.path / "memory.limit_in_bytes").write_text(str(limit))
        swap = self.path / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit))

    @staticmethod
    def create(limit: int) -> Cgroup | None:
        try:
            return Cgroup(limit)
        except OSError:
            return None

    def enter(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def oom_killed(self) -> bool:
        try:
            return "oom_kill 0" not in (self.path / "memory.oom_control").read_text()
        except OSError:
            return False

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    files = {}
    for path in folder.rglob("*"):
        if path.is_file():
            stat = path.stat()
            files[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return files


def measure(
    engine: str,
    workload: str,
    rows: int,
    command: list[str],
    out: Path,
    log: Path,
    env: dict[str, str] | None = None,
    cgroup: Cgroup | None = None,
) -> Measure:
    result = Measure(engine, workload, rows)
    before = snapshot(out)
    started = time.monotonic()
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        child = subprocess.Popen(
            command,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
            preexec_fn=cgroup.enter if cgroup else None,
        )
        tree = Tree(child.pid)
        sampler = threading.Thread(target=tree.run, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        tree.done.set()
        sampler.join()
    result.wall = time.monotonic() - started
    # getrusage counts the waited-for tree; the samples also count daemons it left behind.
    if usage.ru_utime + usage.ru_stime >= sum(tree.cpu.values()):
        result.cpu, result.kernel = usage.ru_utime + usage.ru_stime, usage.ru_stime
    else:
        result.cpu, result.kernel = sum(tree.cpu.values()), sum(tree.kernel.values())
    result.peak_rss = max(usage.ru_maxrss * 1024, tree.peak)
    if child.returncode != 0:
        result.ok = False
        killed = cgroup is not None and cgroup.oom_killed()
        result.note = "killed at the memory cap" if killed else f"exit {child.returncode}, see {log}"
    after = snapshot(out)
    written = [path for path, meta in after.items() if before.get(path) != meta]
    result.files = len(written)
    result.bytes_written = sum(after[path][0] for path in written)
    return result


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.n = parse_scale(args.scale)
        self.work = Path(args.work or Path.home() / ".cache/medallion/bench" / human(self.n)).resolve()
        self.data = self.work / "data"
        self.python = sys.executable
        self.measures: list[Measure] = []
        self.round = 1
        self.expected: dict[str, dict] = {}
        self.versions: dict[str, str] = {}

    # ---- data -------------------------------------------------------------------------------------
    def generate(self) -> None:
        marker = self.data / ".generated"
        if marker.exists():
            print(f"data: {self.data} (generated before)")
            return
        shutil.rmtree(self.data, ignore_errors=True)
        print(f"data: generating {self.n:,} transactions into {self.data} ...", flush=True)
        subprocess.run(
            [
                self.args.medallion, "generate", "--out", str(self.data),
                "--transactions", str(self.n), "--days", str(self.args.days), "--change-days", "0",
                "--change-batch", str(self.n // 10), "--rows-per-load-file", str(self.args.rows_per_file),
                "--seed", "42",
            ],
            check=True,
        )
        marker.write_text("")

    @property
    def batch(self) -> int:
        """Changes in the incremental batch."""
        return self.args.batch or self.n // 10

    @property
    def batch_dir(self) -> Path:
        """Where the incremental batch is: generated with the load (the default), or apart."""
        if self.batch == self.n // 10 and not self.args.batch_days:
            return self.data / "batch"
        return self.work / f"batch-{human(self.batch)}-{self.args.batch_days or 'all'}d"

    def generate_batch(self) -> None:
        """A batch other than the default: the same seed makes the same load (discarded) and this batch."""
        marker = self.batch_dir / ".generated"
        if self.batch_dir == self.data / "batch" or marker.exists():
            return
        scratch = self.work / "batch-scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(self.batch_dir, ignore_errors=True)
        print(f"data: generating a batch of {self.batch:,} changes into {self.batch_dir} ...", flush=True)
        subprocess.run(
            [
                self.args.medallion, "generate", "--out", str(scratch),
                "--transactions", str(self.n), "--days", str(self.args.days), "--change-days", "0",
                "--change-batch", str(self.batch), "--change-batch-days", str(self.args.batch_days),
                "--rows-per-load-file", str(self.args.rows_per_file), "--seed", "42",
            ],
            check=True,
        )
        (scratch / "batch").rename(self.batch_dir)
        shutil.rmtree(scratch)
        marker.write_text("")

    def load_files(self) -> list[Path]:
        return sorted((self.data / "public/transactions").glob("LOAD*.csv"))

    def batch_files(self) -> list[Path]:
        return sorted((self.batch_dir / "public/transactions").glob("*.csv"))

    def dv_project(self) -> Path:
        """The reference project with Silver created with deletion vectors, and the fact refreshed by
        key with them (`incremental.key`): its YAML edited, its SQL linked."""
        project = self.work / "medallion-dv" / "project"
        (project / "pipelines").mkdir(parents=True, exist_ok=True)
        if not (project / "sql").exists():
            (project / "sql").symlink_to(ROOT / "sql")
        yaml = (ROOT / "pipelines" / "transactions.yaml").read_text()
        edits = [
            ("    mode: cdc\n    zorder_by: [dms_id]\n",
             "    mode: cdc\n    deletion_vectors: true\n    zorder_by: [dms_id]\n"),
            ("    target: gold.fact_transactions\n    mode: overwrite\n"
             "    incremental: { column: txn_date, source: silver.transactions }\n",
             "    target: gold.fact_transactions\n    mode: overwrite\n    deletion_vectors: true\n"
             "    incremental: { key: transaction_id, source: silver.transactions }\n"),
        ]
        for anchor, edited in edits:
            if anchor not in yaml:
                raise SystemExit(f"medallion-dv: a stage of pipelines/transactions.yaml moved: {anchor!r}")
            yaml = yaml.replace(anchor, edited, 1)
        path = project / "pipelines" / "transactions.yaml"
        path.write_text(yaml)
        return path

    def landing(self, engine: str) -> Path:
        """A landing folder of hard links to the generated files (no copy), with the full load only."""
        landing = self.work / engine / "landing"
        shutil.rmtree(landing, ignore_errors=True)
        for source in self.data.rglob("*"):
            relative = source.relative_to(self.data)
            if source.is_dir() or relative.parts[0] == "batch" or source.name.startswith("."):
                continue
            target = landing / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, target)
        return landing

    def deliver_batch(self, landing: Path) -> None:
        for source in self.batch_files():
            target = landing / "public/transactions" / source.name
            if not target.exists():
                os.link(source, target)

    def start_log(self, log: Path) -> None:
        """Empties `log` in the first round; later rounds append to it, each under a marker."""
        if self.round == 1:
            log.write_text("")
        if self.args.repeat > 1:
            with log.open("a") as handle:
                handle.write(f"# round {self.round}\n")

    def record(self, result: Measure) -> None:
        result.round = self.round
        self.measures.append(result)
        self.report_line(result)

    # ---- engines ----------------------------------------------------------------------------------
    def command(self, engine: str, stages: str, landing: Path, out: Path) -> tuple[list[str], dict]:
        if engine in ("medallion", "medallion-dv"):
            names = {
                "ingest": "bronze_transactions,silver_transactions",
                "gold": "gold_daily_kpis,gold_merchant_daily,gold_fact_transactions",
                "all": "bronze_transactions,silver_transactions,gold_daily_kpis,gold_merchant_daily,"
                "gold_fact_transactions",
            }[stages]
            env = {"MEDALLION_LAKE": str(out), "MEDALLION_LANDING": str(landing)}
            yaml = "pipelines/transactions.yaml" if engine == "medallion" else str(self.dv_project())
            return [self.args.medallion, "-q", "run", yaml, "--select", names], env
        script = PEERS / f"{engine}_peer.py"
        return [self.python, str(script), stages, "--landing", str(landing), "--out", str(out)], {}

    def run_engine(self, engine: str) -> None:
        workloads = self.args.workloads
        base = self.work / engine
        out = base / "lake"
        saved = base / "saved"
        log = base / "log.txt"
        base.mkdir(parents=True, exist_ok=True)
        self.start_log(log)
        n, batch = self.n, self.batch

        def run(workload: str, stages: str, landing: Path, rows: int, cap: int | None = None) -> Measure:
            command, env = self.command(engine, stages, landing, out)
            cgroup = None
            if cap is not None:
                env = {**env, "BENCH_MEMORY_CAP": str(cap)}
                if engine in ("medallion", "medallion-dv"):
                    env["MEDALLION_MEMORY_LIMIT"] = str(cap // 2)
                cgroup = Cgroup.create(cap)
            try:
                result = measure(engine, workload, rows, command, out, log, env, cgroup)
            finally:
                if cgroup:
                    cgroup.remove()
            if cap is not None and cgroup is None:
                result.note = (result.note + "; " if result.note else "") + "not capped: no memory cgroup here"
            self.record(result)
            return result

        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        landing = self.landing(engine)
        if {"ingest", "gold", "incremental", "capped"} & set(workloads):
            ingest = run("ingest", "ingest", landing, n)
            gold = run("gold", "gold", landing, n) if ingest.ok else None
            if gold and gold.ok:
                self.check(engine, "full", out, [ingest, gold])
            if gold and gold.ok and {"incremental", "capped"} & set(workloads):
                shutil.rmtree(saved, ignore_errors=True)
                shutil.copytree(out, saved, symlinks=True)
                self.deliver_batch(landing)
                if "incremental" in workloads:
                    incremental = run("incremental", "all", landing, batch)
                    if incremental.ok:
                        self.check(engine, "incremental", out, [incremental])
                if "capped" in workloads:
                    shutil.rmtree(out)
                    shutil.copytree(saved, out, symlinks=True)
                    capped = run("capped", "all", landing, batch, cap=parse_bytes(self.args.cap))
                    if capped.ok:
                        self.check(engine, "incremental", out, [capped])
                shutil.rmtree(saved, ignore_errors=True)
        if "pipeline" in workloads:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            landing = self.landing(engine)
            pipeline = run("pipeline", "all", landing, n)
            if pipeline.ok:
                self.check(engine, "full", out, [pipeline])
        if not self.args.keep:
            shutil.rmtree(out, ignore_errors=True)

    def run_floor(self) -> None:
        out = self.work / "floor"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        log = self.work / "floor.log"
        self.start_log(log)
        command = [self.args.floor, str(out)] + [str(p) for p in self.load_files()]
        result = measure("floor (CSV->Parquet)", "ingest", self.n, command, out, log)
        self.record(result)
        shutil.rmtree(out, ignore_errors=True)

    # ---- checks -----------------------------------------------------------------------------------
    def check(self, engine: str, state: str, out: Path, measures: list[Measure]) -> None:
        """Compares the engine's tables with medallion's (the first engine run) for the same state."""
        reader = PEERS / "check.py"
        found = subprocess.run(
            [self.python, str(reader), str(out)], capture_output=True, text=True, cwd=ROOT
        )
        if found.returncode != 0:
            verdict = f"DIFFERS: cannot read its tables ({found.stderr.strip().splitlines()[-1:]})"
        else:
            facts = json.loads(found.stdout)
            expected = self.expected.setdefault(state, facts) if engine == "medallion" else self.expected.get(state)
            if expected is None:
                verdict = "not checked (no medallion result)"
            else:
                wrong = [
                    f"{key} {facts.get(key)} != {value}"
                    for key, value in expected.items()
                    if facts.get(key) != value
                ]
                verdict = "same" if not wrong else "DIFFERS: " + "; ".join(wrong[:3])
        for measure_ in measures:
            measure_.check = verdict
        if verdict != "same":
            print(f"  check {engine} ({state}): {verdict}", flush=True)

    # ---- report -----------------------------------------------------------------------------------
    def report_line(self, m: Measure) -> None:
        status = "" if m.ok else f"  FAILED: {m.note}"
        shown = f" #{m.round}" if self.args.repeat > 1 else ""
        print(
            f"  {m.workload:<12} {m.engine + shown:<22} {m.wall:8.1f} s  cpu {m.cpu:7.1f} s "
            f"(kernel {m.kernel:5.1f} s)  "
            f"peak {m.peak_rss / 2**20:7.0f} MiB  {m.files:5d} files  {m.bytes_written / 2**20:8.1f} MiB{status}",
            flush=True,
        )

    def table(self) -> str:
        """One row per workload and engine: medians over the rounds, each with its range when there are
        several, and the ratio of medians to medallion's with the range of each round's own ratio."""
        rounds: dict[tuple[str, str], list[Measure]] = {}
        for m in self.measures:
            rounds.setdefault((m.workload, m.engine), []).append(m)
        ours = {w: ms for (w, e), ms in rounds.items() if e == "medallion"}

        def spread(values: list[float], form: str) -> str:
            middle = format(statistics.median(values), form)
            if len(values) < 2:
                return middle
            return f"{middle} ({format(min(values), form)}–{format(max(values), form)})"

        lines = [
            "| workload | engine | wall s | CPU s | of it kernel s | rows/s | peak RSS MiB | files | MiB written | vs medallion | same result |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for workload in ["ingest", "gold", "incremental", "capped", "pipeline"]:
            for (w, engine), ms in rounds.items():
                if w != workload:
                    continue
                # Times count from rounds that finished with the same result as medallion's.
                done = [m for m in ms if m.counts]
                mine = [m for m in ours.get(workload, []) if m.counts]
                failed = [m for m in ms if not m.ok]
                differs = sorted({m.check for m in ms if m.check.startswith("DIFFERS")})
                if not done:
                    verdict, label = (differs[0], "does not count") if differs else (failed[0].note, "failed")
                    lines.append(f"| {workload} | {engine} | | | | | | | | {label} | {verdict} |")
                    continue
                wall = statistics.median(m.wall for m in done)
                ratio = ""
                if engine != "medallion" and mine:
                    ratio = f"{wall / statistics.median(m.wall for m in mine):.2f}x"
                    paired = [
                        m.wall / o.wall for m in done for o in mine if o.round == m.round
                    ]
                    if len(paired) > 1:
                        ratio += f" ({min(paired):.2f}–{max(paired):.2f}x)"
                check = "yes" if {m.check for m in done} == {"same"} else "n/a"
                if differs:
                    check = f"{len(ms) - len(done) - len(failed)} of {len(ms)} rounds {differs[0]}"
                if failed:
                    check += f"; {len(failed)} of {len(ms)} rounds failed: {failed[0].note}"
                first = done[0]
                lines.append(
                    f"| {workload} | {engine} | {spread([m.wall for m in done], '.1f')} | "
                    f"{spread([m.cpu for m in done], '.1f')} | {spread([m.kernel for m in done], '.1f')} | "
                    f"{first.rows / wall:,.0f} | "
                    f"{max(m.peak_rss for m in ms) / 2**20:,.0f} | {first.files} | "
                    f"{first.bytes_written / 2**20:,.1f} | {ratio} | {check} |"
                )
        return "\n".join(lines)

    def collect_versions(self) -> None:
        medallion = subprocess.run([self.args.medallion, "--version"], capture_output=True, text=True)
        self.versions["medallion"] = medallion.stdout.strip().removeprefix("medallion ")
        probe = (
            "import importlib.metadata as m, json; "
            "print(json.dumps({p: m.version(p) for p in ['deltalake','pyarrow','polars','duckdb','pyspark']}))"
        )
        found = subprocess.run([self.python, "-c", probe], capture_output=True, text=True)
        if found.returncode == 0:
            self.versions.update(json.loads(found.stdout))
        java = subprocess.run(["java", "-version"], capture_output=True, text=True)
        self.versions["java"] = (java.stderr.splitlines() or ["not found"])[0]

    def machine(self) -> str:
        cpu = "unknown cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        return f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB RAM, {platform.platform()}"

    def reproduce_command(self) -> str:
        """The `bench/run.sh` command line that reproduces this run, from the parsed options."""
        a = self.args
        parts = ["bench/run.sh", "--scale", a.scale]
        defaults = {"engines": ",".join(DEFAULT_ENGINES), "workloads": ",".join(WORKLOADS), "cap": "2G",
                    "days": 3650, "rows_per_file": 1_000_000, "batch": 0, "batch_days": 0}
        for name, default in defaults.items():
            value = getattr(a, name)
            if isinstance(value, list):
                value = ",".join(value)
            if value != default:
                shown = human(value) if name == "batch" else str(value)
                parts += [f"--{name.replace('_', '-')}", shown]
        if a.no_floor:
            parts.append("--no-floor")
        if a.repeat != 1:
            parts += ["--repeat", str(a.repeat)]
        return " ".join(parts)

    def rounds_line(self) -> str:
        if self.args.repeat == 1:
            return ""
        return (
            f"- Rounds: {self.args.repeat}, each running the floor and then every engine in turn. Each cell is "
            "the median over the rounds, with the range in brackets; vs medallion is the ratio of medians, "
            "with the range of each round's own ratio; peak RSS is the largest of the rounds (failed ones included). "
            "Times count only from rounds whose tables matched medallion's.\n"
        )

    def write_results(self, started: dt.datetime) -> Path:
        results = ROOT / "bench" / "results"
        results.mkdir(parents=True, exist_ok=True)
        suffix = "" if self.batch_dir == self.data / "batch" else f"-{self.batch_dir.name}"
        path = results / f"{started:%Y-%m-%d}-{human(self.n)}{suffix}.md"
        if path.exists():
            # A second run the same day keeps the first: the time tells them apart.
            path = results / f"{started:%Y-%m-%d-%H%M}-{human(self.n)}{suffix}.md"
        command = self.reproduce_command()
        versions = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        text = (
            f"# Benchmarks, N = {self.n:,} transactions ({started:%Y-%m-%d %H:%M} UTC)\n\n"
            f"- Machine: {self.machine()}\n"
            f"- Versions: {versions}\n"
            f"- Command: `{command.strip()}`\n"
            f"- Data: `medallion generate --transactions {self.n} --days {self.args.days} --change-days 0 "
            f"--change-batch {self.batch} --change-batch-days {self.args.batch_days} --seed 42` "
            f"({len(self.load_files())} full-load files, "
            f"{sum(p.stat().st_size for p in self.load_files()) / 2**20:,.0f} MiB of CSV; "
            f"batch of {self.batch:,} changes, updates and deletes over "
            f"{f'the last {self.args.batch_days} days' if self.args.batch_days else 'all dates'})\n"
            f"- Memory cap of `capped`: {self.args.cap} (cgroup v1 memory.limit_in_bytes; medallion also gets "
            f"`MEDALLION_MEMORY_LIMIT` = half of it)\n"
            f"{self.rounds_line()}\n"
            f"{self.table()}\n\n"
            "rows/s is rows of input (N for ingest, gold and pipeline, the batch for incremental) per wall "
            "second. vs medallion is the peer's wall time over ours: above 1 means we are faster. Of it kernel "
            "is the CPU spent in the kernel (page faults and the zeroing of fresh pages, file copies): when it "
            "grows between runs of the same engine, the machine's memory got slower, not the engine. Peak RSS is "
            "the largest resident set of the process tree, sampled every 50 ms and from getrusage.\n"
        )
        path.write_text(text)
        return path


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="bench/run.sh",
        description="Benchmarks medallion against Python deltalake, Polars + deltalake, DuckDB and PySpark "
        "on the reference workload, and against the CSV->Parquet floor.",
    )
    parser.add_argument("--scale", default="1m", help="transactions in the full load: 100k, 1m, 10m, 30m")
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                        help=f"comma-separated, of {','.join(ENGINES)} (default: all but medallion-dv)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {','.join(WORKLOADS)}")
    parser.add_argument("--cap", default="2G", help="memory cap of the `capped` workload")
    parser.add_argument("--days", type=int, default=3650, help="days the transactions spread over")
    parser.add_argument("--rows-per-file", type=int, default=1_000_000, help="rows per full-load CSV file")
    parser.add_argument("--batch", type=parse_scale, default=0,
                        help="changes in the incremental batch, e.g. 100k (default N/10)")
    parser.add_argument("--batch-days", type=int, default=0,
                        help="the batch's updates and deletes hit keys of the last this many days (default: all)")
    parser.add_argument("--work", help="working folder (default ~/.cache/medallion/bench/<scale>)")
    parser.add_argument("--keep", action="store_true", help="keep every engine's tables afterwards")
    parser.add_argument("--no-floor", action="store_true", help="skip the CSV->Parquet floor")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of the whole run, each running the floor then every engine; the "
                        "table gives medians and ranges (default 1)")
    parser.add_argument("--medallion", required=True, help=argparse.SUPPRESS)
    parser.add_argument("--floor", required=True, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.engines = [e for e in args.engines.split(",") if e]
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(args.engines) - set(ENGINES) | set(args.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown engine or workload: {', '.join(sorted(unknown))}")
    if args.repeat < 1:
        parser.error("--repeat takes a number of rounds, 1 or more")
    if "medallion" in args.engines:
        args.engines = ["medallion"] + [e for e in args.engines if e != "medallion"]
    if "spark" in args.engines and shutil.which("java") is None:
        print("spark: skipped, no java on this machine")
        args.engines.remove("spark")

    started = dt.datetime.now(dt.timezone.utc)
    bench = Bench(args)
    bench.generate()
    bench.generate_batch()
    bench.collect_versions()
    for round_ in range(1, args.repeat + 1):
        bench.round = round_
        if args.repeat > 1:
            print(f"round {round_} of {args.repeat}:", flush=True)
        if "ingest" in args.workloads and not args.no_floor:
            print("floor:", flush=True)
            bench.run_floor()
        for engine in args.engines:
            print(f"{engine}:", flush=True)
            bench.run_engine(engine)
    print()
    print(bench.table())
    path = bench.write_results(started)
    print(f"\nwritten to {path.relative_to(ROOT)}")
    differs = [m for m in bench.measures if m.check.startswith("DIFFERS")]
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
