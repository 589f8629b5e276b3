# Shared by scripts/pjdfstest and scripts/fsx: a fresh nacrithfs mount of this build.
# Sourced, not run.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NACRITHFS="$ROOT/target/release/nacrithfs"

need_root() {
  if [ "$(id -u)" -ne 0 ]; then echo "$0: run as root (FUSE mounts, user switching)" >&2; exit 2; fi
}

ensure_tool() { # ensure_tool BINARY CRATE
  if ! command -v "$1" >/dev/null; then
    echo "installing $2 from crates.io (cargo install --locked $2)"
    cargo install --locked "$2"
  fi
}

build() {
  (cd "$ROOT" && cargo build --release --locked --bin nacrithfs)
}

# mount_fresh OPTIONS: sets WORK, BACKING, MNT; unmounted and removed on exit.
mount_fresh() {
  WORK=$(mktemp -d /var/tmp/nacrithfs-conf.XXXXXX)
  BACKING="$WORK/backing"; MNT="$WORK/mnt"
  # Tests switch to other users: they must reach the mount point.
  chmod 755 "$WORK"
  mkdir "$BACKING" "$MNT"
  trap cleanup EXIT
  "$NACRITHFS" "$BACKING" "$MNT" -o "$1"
  grep " $MNT " /proc/mounts
}

# The daemon finishes its clean stop (index flush) after umount returns: wait for it
# before removing the backing directory under it.
cleanup() {
  umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
  for _ in $(seq 300); do
    pgrep -f -- "$NACRITHFS $BACKING " >/dev/null || break
    sleep 0.1
  done
  rm -rf "$WORK"
}
