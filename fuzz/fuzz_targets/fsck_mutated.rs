//! fsck on a damaged backing directory (`nacrithfs::fuzzing::fsck_mutated`): a copy of
//! the committed format-v1 volume with index entries planted, removed or mutated and
//! blob/cache files overwritten, cut, removed or planted, as the input says. fsck
//! answers and never panics; after a successful --repair, a second check finds nothing
//! fixable.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn dirs() -> &'static (PathBuf, PathBuf) {
    static D: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    D.get_or_init(|| {
        let template = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/format-v1");
        let scratch = std::env::temp_dir().join(format!("nacrithfs-fuzz-fsck-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).expect("scratch directory");
        (template, scratch)
    })
}

fuzz_target!(|data: &[u8]| {
    let (template, scratch) = dirs();
    nacrithfs::fuzzing::fsck_mutated(data, template, scratch);
});
