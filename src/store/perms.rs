//! Who may see the backing directory. It holds every archived file's plaintext (cache/),
//! its compressed bytes (blobs/), the index and a log that names paths: whatever the
//! mount's permission bits say, a user who can read it reads everything. So it is the
//! daemon's alone: 0700, owned by the daemon's user (or root), on a path no other user
//! can replace (ssh's StrictModes rule).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode bits for the backing directory and the directories in it.
pub const DIR_MODE: u32 = 0o700;
/// The umask of the daemon and of fsck: everything they create is the owner's only.
pub const UMASK: u32 = 0o077;

/// Why a backing directory is refused.
fn refuse(path: &Path, why: &str) -> String {
    format!(
        "backing directory refused: {} {why}; the backing directory holds every file's plaintext, so it and every directory above it must be owned by root or by the daemon's user and not writable by others",
        path.display()
    )
}

/// Check the backing directory and the path to it before a mount. Refused: a backing
/// directory owned by another non-root user or writable by group or others; an
/// ancestor owned by another non-root user, or writable by group or others without the
/// sticky bit (as /tmp is). A backing directory readable by others is tightened to 0700
/// (unless `read_only`: then only a warning). Returns what was done, for the log.
pub fn secure_backing(backing: &Path, read_only: bool) -> Result<Option<String>, String> {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let meta = std::fs::metadata(backing)
        .map_err(|e| format!("backing directory {}: {e}", backing.display()))?;
    if meta.uid() != me && meta.uid() != 0 {
        return Err(refuse(
            backing,
            &format!("is owned by uid {}, not by uid {me}", meta.uid()),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse(
            backing,
            &format!(
                "is writable by group or others (mode {:o})",
                meta.mode() & 0o7777
            ),
        ));
    }
    for dir in ancestors(backing) {
        let m = std::fs::metadata(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if m.uid() != me && m.uid() != 0 {
            return Err(refuse(&dir, &format!("is owned by uid {}", m.uid())));
        }
        if m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0 {
            return Err(refuse(
                &dir,
                &format!(
                    "is writable by group or others without the sticky bit (mode {:o})",
                    m.mode() & 0o7777
                ),
            ));
        }
    }
    // The backing directory and the directories in it (older versions made them 0755).
    let loose = loose_modes(backing).map_err(|e| format!("{}: {e}", backing.display()))?;
    if loose.is_empty() {
        return Ok(None);
    }
    let list = loose
        .iter()
        .map(|l| format!("{} ({:o})", l.path.display(), l.mode))
        .collect::<Vec<_>>()
        .join(", ");
    if read_only {
        return Ok(Some(format!(
            "readable by other users: {list}; a read-only mount leaves them so: chmod 700 them"
        )));
    }
    for l in &loose {
        std::fs::set_permissions(&l.path, std::fs::Permissions::from_mode(DIR_MODE))
            .map_err(|e| format!("chmod 700 {}: {e}", l.path.display()))?;
    }
    Ok(Some(format!(
        "made private (mode 700; they hold every file's plaintext): {list}"
    )))
}

/// The directories of a backing directory.
/// (`index` is the sled index of formats 1 and 2, until the move to format 3.)
const SUBDIRS: [&str; 5] = [
    "blobs",
    "cache",
    super::INDEX_DIR,
    "index",
    super::fsck::LOST_FOUND,
];

/// The directories above `path`, nearest first (`path` is absolute and canonical).
fn ancestors(path: &Path) -> Vec<PathBuf> {
    path.ancestors().skip(1).map(Path::to_path_buf).collect()
}

/// A directory of the backing directory whose mode lets others in.
#[derive(Debug)]
pub struct LooseMode {
    pub path: PathBuf,
    pub mode: u32,
}

/// The backing directory and its directories, where group or other bits are set. (The
/// files in them are created 0600; what guards them is that no one else can enter.)
pub fn loose_modes(backing: &Path) -> std::io::Result<Vec<LooseMode>> {
    let mut out = Vec::new();
    for dir in std::iter::once(backing.to_path_buf()).chain(SUBDIRS.iter().map(|d| backing.join(d)))
    {
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() && m.mode() & 0o077 != 0 => out.push(LooseMode {
                path: dir,
                mode: m.mode() & 0o7777,
            }),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}
