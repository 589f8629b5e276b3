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
"""
import json
import os
import subprocess
import sys
import threading
import time

# Seconds each binary took on the 2-core VM (2026-12-03, one lane): the queue runs the
# longest first so that the lanes end together. A binary not listed counts as 60 s.
EXPECTED = {
    "crash": 900,
    "determinism": 715,
    "reliability": 404,
    "fs": 348,
    "codec": 286,
    "security": 205,
    "packs": 195,
    "scale": 150,
    "durability": 120,
    "reference": 100,
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


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    jobs = build(root)
    only = [o for o in os.environ.get("NACRITHFS_TEST_ONLY", "").split(",") if o]
    if only:
        jobs = [j for j in jobs if j[0] in only]
    jobs.sort(key=lambda j: -EXPECTED.get(j[0], 60))
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
            with open(path, "wb") as out:
                # The cwd cargo gives a test: the package root.
                rc = subprocess.run([exe], cwd=root, stdout=out, stderr=subprocess.STDOUT).returncode
            took = time.time() - t
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
            summary = [l for l in text.splitlines() if l.startswith("test result:")]
            with lock:
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
