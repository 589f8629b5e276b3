"""The test binaries of `cargo test --release`, run on parallel lanes (used by scripts/test).

cargo runs its test binaries one after another, and most of the long ones spend their
time in one llama.cpp context (one thread: the tests take a lock so that model tests in
one binary run one at a time), so on two cores half the machine sat idle for most of an
hour. Here the binaries are built once by cargo, then run directly, longest first, by
LANES workers (one per core, at most 4; NACRITHFS_TEST_LANES overrides;
NACRITHFS_TEST_ONLY=fs,cli runs only those binaries). Each binary's
output goes to target/test-logs/<name>.log and is printed whole when it ends; a summary
table follows, and the exit status is 1 if any binary failed (all of them run, unlike
`cargo test`, which stops at the first failing binary).

A binary that runs past its limit (NACRITHFS_TEST_TIMEOUT seconds, else 2.5 times its
expected time and at least 600 s) is a hang: the backtraces of every thread of it and of
the daemons it started (gdb), and the tails of those daemons' logs, go into its log, then
it is killed and counted as failed, and the other binaries go on. (A hang used to run
until CI's own limit took the whole run, with nothing to say where it hung.)
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

# Seconds each binary took on the 2-core VM (2026-12-05, two lanes): the queue runs the
# longest first so that the lanes end together, and a binary's hang limit is 2.5 times
# its figure. A binary not listed counts as 60 s.
EXPECTED = {
    "crash": 950,
    "determinism": 640,
    "fs": 630,
    "reliability": 430,
    "codec": 355,
    "packs": 305,
    "security": 170,
    "scale": 150,
    "reference": 40,
    "fuzz_regressions": 30,
}


def build(root):
    """Build every test binary (cargo's own rules); [(name, executable)]."""
    cmd = ["cargo", "test", "--release", "--locked", "--no-run", "--message-format=json-render-diagnostics"]
    p = subprocess.run(cmd, cwd=root, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit(f"scripts/test: the build failed ({' '.join(cmd)} exited {p.returncode})")
    jobs = []
    for line in p.stdout.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
            continue
        if not msg.get("profile", {}).get("test"):
            continue
        t = msg["target"]
        kind = t["kind"][0]
        name = t["name"] if kind == "test" else f"{kind}-{t['name']}"
        jobs.append((name, msg["executable"]))
    if not jobs:
        sys.exit("scripts/test: cargo built no test binary")
    return jobs


def descendants(pid):
    """pid and every process below it (children first found through /proc)."""
    kids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # The field after the parenthesised name is the state, then the ppid.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def argv_of(pid):
    """The command line of a process ([] once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def report_hang(pid, out):
    """Write what a hung binary and its daemons are doing into its log."""
    def w(text):
        out.write(text.encode("utf-8", "replace"))
        out.flush()

    for p in descendants(pid):
        argv = argv_of(p)
        if not argv:
            continue
        w(f"\n==== hang: pid {p}: {' '.join(argv)}\n")
        if shutil.which("gdb"):
            try:
                bt = subprocess.run(
                    ["gdb", "-p", str(p), "-batch", "-ex", "thread apply all bt"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
                )
                w(bt.stdout.decode("utf-8", "replace"))
            except subprocess.TimeoutExpired:
                w("(gdb did not answer in 120 s)\n")
        else:
            w("(no gdb: kernel stacks only)\n")
            try:
                tasks = sorted(os.listdir(f"/proc/{p}/task"))
            except OSError:
                tasks = []
            for t in tasks:
                try:
                    with open(f"/proc/{p}/task/{t}/stack") as f:
                        w(f"-- thread {t}\n{f.read()}")
                except OSError:
                    pass
        # A test daemon logs to <backing>.daemon.log (tests/common/mount.rs).
        if len(argv) > 2 and os.path.basename(argv[0]) == "nacrithfs" and argv[1].startswith("/"):
            log = argv[1].rstrip("/") + ".daemon.log"
            try:
                with open(log, "rb") as f:
                    tail = f.read()[-20000:].decode("utf-8", "replace")
                w(f"\n==== the last of {log}\n{tail}\n")
            except OSError as e:
                w(f"\n==== {log}: {e}\n")


def run_binary(exe, root, out, limit):
    """Run one test binary into `out`; its exit status, or None if it hung."""
    p = subprocess.Popen([exe], cwd=root, stdout=out, stderr=subprocess.STDOUT)
    try:
        return p.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        pass
    out.write(f"\n==== scripts/test: still running after {limit:.0f} s: a hang\n".encode())
    out.flush()
    # The mount points of its daemons (argv: nacrithfs BACKING MNT ...), to clear once
    # they are killed: a dead mount hangs the next `ls` of its parent. Only these: the
    # other lanes' mounts are alive.
    mounts = []
    for q in descendants(p.pid):
        argv = argv_of(q)
        if len(argv) > 2 and os.path.basename(argv[0]) == "nacrithfs" and argv[1].startswith("/"):
            mounts.append(argv[2])
    try:
        report_hang(p.pid, out)
    finally:
        for q in descendants(p.pid):
            try:
                os.kill(q, signal.SIGKILL)
            except OSError:
                pass
        p.wait()
        for m in mounts:
            try:
                subprocess.run(["umount", "-l", m], stderr=subprocess.DEVNULL)
            except OSError as e:
                out.write(f"\n==== umount -l {m}: {e}\n".encode())
    return None


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fixed = os.environ.get("NACRITHFS_TEST_TIMEOUT")
    try:
        fixed = float(fixed) if fixed else None
    except ValueError:
        sys.exit(f"scripts/test: NACRITHFS_TEST_TIMEOUT={fixed!r} is not a number of seconds")

    jobs = build(root)
    only = [o for o in os.environ.get("NACRITHFS_TEST_ONLY", "").split(",") if o]
    if only:
        jobs = [j for j in jobs if j[0] in only]
    jobs.sort(key=lambda j: -EXPECTED.get(j[0], 60))
    all_jobs = list(jobs)
    lanes = int(os.environ.get("NACRITHFS_TEST_LANES") or min(4, max(1, os.cpu_count() or 1)))
    logs = os.path.join(root, "target", "test-logs")
    os.makedirs(logs, exist_ok=True)
    print(f"scripts/test: {len(jobs)} test binaries on {lanes} lanes (logs in {logs})", flush=True)

    lock = threading.Lock()
    results = []  # (name, returncode, seconds, last "test result" line)
    start = time.time()

    def lane():
        while True:
            with lock:
                if not jobs:
                    return
                name, exe = jobs.pop(0)
            path = os.path.join(logs, f"{name}.log")
            t = time.time()
            limit = fixed or max(600.0, 2.5 * EXPECTED.get(name, 60))
            try:
                with open(path, "wb") as out:
                    # The cwd cargo gives a test: the package root.
                    rc = run_binary(exe, root, out, limit)
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8", "replace")
            except Exception as e:  # noqa: BLE001 - any error is this binary's failure
                rc, text = -2, f"scripts/test could not run {exe}: {e!r}\n"
            took = time.time() - t
            summary = [l for l in text.splitlines() if l.startswith("test result:")]
            with lock:
                if rc is None:
                    verdict = f"FAILED (hung: killed after {took:.0f} s)"
                    rc = -1
                elif rc == -2:
                    verdict = "FAILED (not run)"
                else:
                    verdict = "ok" if rc == 0 else f"FAILED (exit {rc})"
                print(f"\n==== {name}: {verdict} in {took:.0f} s", flush=True)
                sys.stdout.write(text)
                sys.stdout.flush()
                results.append((name, rc, took, summary[-1][len("test result: "):] if summary else "no test result line"))

    threads = [threading.Thread(target=lane) for _ in range(lanes)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()

    # Doctests (none today, but cargo test would run them): after the lanes, on their own.
    t = time.time()
    doc = subprocess.run(["cargo", "test", "--release", "--locked", "--doc"], cwd=root)
    results.append(("doctests", doc.returncode, time.time() - t, ""))

    # Every binary has a result line (a lane that died would leave some out).
    ran = {r[0] for r in results}
    for name, _ in all_jobs:
        if name not in ran:
            results.append((name, -3, 0.0, "never run (a lane of scripts/test died)"))
    failed = [r for r in results if r[1] != 0]
    print(f"\n{'binary':<28} {'seconds':>8}  result")
    for name, rc, took, summary in sorted(results, key=lambda r: -r[2]):
        print(f"{name:<28} {took:8.0f}  {'ok' if rc == 0 else 'FAILED'}  {summary}")
    print(f"{len(results)} binaries, {len(failed)} failed, {time.time() - start:.0f} s on {lanes} lanes")
    if failed:
        print("failed: " + ", ".join(r[0] for r in failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
