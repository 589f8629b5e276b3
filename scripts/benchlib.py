"""What the benchmark scripts share: running the release binaries, reading a blob's chunk
table, and one stream of this build timed in the same run as the figures it is compared
with."""
import os
import platform
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# NACRITHFS_BIN: a copy of the binary, so a benchmark can run while cargo rebuilds.
NACRITHFS = os.environ.get("NACRITHFS_BIN") or os.path.join(ROOT, "target", "release", "nacrithfs")
NACRITH = os.path.join(ROOT, "target", "release", "nacrith")


def banner():
    """The first line of a benchmark's output: which script, when, on what machine."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            cpu = m.group(1) if m else cpu
    except OSError:
        pass
    return (f"# {os.path.basename(sys.argv[0])} {time.strftime('%Y-%m-%d %H:%M')} on "
            f"{platform.node()}: {cpu}, {os.cpu_count()} cores")


def die(msg):
    sys.exit(f"{os.path.basename(sys.argv[0])}: {msg}")


def run(cmd, **kw):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if p.returncode != 0:
        die(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def timed(cmd):
    t = time.perf_counter()
    run(cmd)
    return time.perf_counter() - t


def chunks(blob):
    """[(bytes, tokens)] of each chunk of `blob`, from `nacrith info --chunks`."""
    info = run([NACRITH, "info", blob, "--chunks"])
    return [(int(b), int(t)) for b, t in re.findall(r"(\d+) bytes\s+(\d+) tokens", info)]


def chunk_tokens(blob):
    return [t for _, t in chunks(blob)]


class OneStream:
    """One stream (one context, one lane) of this build, measured in this run.

    A `nacrith` run pays a fixed cost (process start, model load) that the daemon pays
    once; it is measured on a few bytes and subtracted, so the figures are coding alone.
    Decoding a token costs what encoding it does (same model step, same CDF)."""

    def __init__(self, tmp):
        self.tmp = tmp
        _, self.fixed_encode, _ = self.encode(b"Fixed cost.\n", "tiny", fixed=0.0)
        self.fixed_decode = 0.0
        self.fixed_decode, _ = self.decode(os.path.join(tmp, "tiny.txt.nc06"))

    def encode(self, text, name, fixed=None):
        """(blob, seconds, tokens) for one stream to encode `text`."""
        src = os.path.join(self.tmp, name + ".txt")
        with open(src, "wb") as f:
            f.write(text)
        dt = timed([NACRITH, "compress", src, "-o", src + ".nc06", "--threads", "1", "--batch", "1"])
        fixed = self.fixed_encode if fixed is None else fixed
        return src + ".nc06", max(dt - fixed, 1e-3), sum(chunk_tokens(src + ".nc06"))

    def decode(self, blob):
        """(seconds, tokens) for one stream to decode `blob`."""
        dt = timed([NACRITH, "decompress", blob, "-o", os.devnull, "--threads", "1", "--batch", "1"])
        return max(dt - self.fixed_decode, 1e-3), sum(chunk_tokens(blob))
