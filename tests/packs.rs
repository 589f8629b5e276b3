//! Pack files (issue 15): small blobs appended to shared packs with compact headers,
//! equal files sharing one packed blob, `du` counting a file's share of its pack,
//! compaction giving back what deleted files held, fsck checking references and
//! counts, a damaged packed blob failing only its own file; solid groups of small
//! files coded together, read back alone, shared, checked. Real mounts, real model.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::mount::*;

/// One blob per file, as these tests count them (solid groups have tests of their own
/// at the end).
const PACK_OPTS: &str = "idle=3600,nogroup";

fn pack_files(backing: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(backing.join("packs"))
        .expect("packs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    v.sort();
    v
}

fn disk_bytes(paths: &[PathBuf]) -> u64 {
    paths
        .iter()
        .map(|p| fs::metadata(p).expect("stat").blocks() * 512)
        .sum()
}

fn lengths(paths: &[PathBuf]) -> u64 {
    paths
        .iter()
        .map(|p| fs::metadata(p).expect("stat").len())
        .sum()
}

/// Three `nacrithfs compact` passes (whatever they answer) leave the packs no larger:
/// a pass that cannot finish must not copy the same blobs again each time.
fn three_compactions_do_not_grow_the_packs(backing: &Path, mnt: &Path) {
    let before = lengths(&pack_files(backing));
    for _ in 0..3 {
        let _ = admin_raw("compact", mnt);
    }
    let after = lengths(&pack_files(backing));
    assert!(
        after <= before,
        "compaction passes grew the packs: {before} -> {after} bytes"
    );
}

fn write_all(mnt: &Path, files: &[(String, Vec<u8>)]) {
    for (name, data) in files {
        fs::write(mnt.join(name), data).unwrap_or_else(|e| panic!("write {name}: {e}"));
    }
}

/// Mount, run one compaction pass, which must compact one pack, and read `files` back
/// through the decompressor.
fn compact_one_pack_and_read(backing: &Path, mnt: &Path, files: &[(String, Vec<u8>)], when: &str) {
    let d = Daemon::start(backing, mnt, PACK_OPTS);
    let _ = admin_raw("compact", mnt);
    assert!(
        d.log_text().contains("1 packs compacted"),
        "{}",
        d.log_text()
    );
    admin("evict", mnt);
    read_all(mnt, files, when);
    d.unmount();
}

/// The pack slot `ino`'s blob is in (it must be packed).
fn packed_slot(store: &nacrithfs::store::Store, ino: u64) -> nacrithfs::store::PackSlot {
    let blob = store.get(ino).expect("get").expect("inode").blob;
    blob.and_then(|b| b.pack).expect("packed")
}

fn read_all(mnt: &Path, files: &[(String, Vec<u8>)], when: &str) {
    for (name, data) in files {
        let got = fs::read(mnt.join(name)).unwrap_or_else(|e| panic!("{name} {when}: {e}"));
        assert!(got == *data, "{name} differs {when}");
    }
}

#[test]
fn small_files_are_packed_shared_compacted_and_checked() {
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    let text = common::english(12_000);
    let mut files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            (
                format!("t{i}.txt"),
                text[i * 1500..i * 1500 + 1200].to_vec(),
            )
        })
        .collect();
    files.push(("copy0.txt".into(), files[0].1.clone()));
    files.push(("copy1.txt".into(), files[1].1.clone()));
    files.push(("r.bin".into(), common::random_bytes(1500, 7)));
    write_all(&mnt, &files[..6]);
    admin("flush", &mnt);
    let coded = status_field(&mnt, "symbols_coded");
    assert!(coded > 500, "the model coded only {coded} symbols");
    write_all(&mnt, &files[6..]);
    admin("flush", &mnt);

    // Every blob went into a pack: no blob file, a few packs (one per coding profile).
    assert!(
        files_under(&backing, "blobs").is_empty(),
        "blob files were written"
    );
    let packs = pack_files(&backing);
    assert!(!packs.is_empty() && packs.len() <= 2, "{packs:?}");
    assert_eq!(status_field(&mnt, "packs"), packs.len() as u64);
    // The copies shared their originals' blobs: no model time, nothing appended.
    assert_eq!(status_field(&mnt, "shared_files"), 2);
    let text_symbols = status_field(&mnt, "symbols_coded");
    assert!(
        text_symbols - coded < 50,
        "the copies were coded again: {coded} -> {text_symbols} symbols"
    );
    // `du` counts each file's share of its pack (its blob and record header), not a
    // block per file; the packs hold all of it in fewer blocks than one per file.
    let mut stored_total = 0;
    for (name, _) in &files {
        let p = mnt.join(name);
        let stored: u64 = xattr(&p, "user.nacrith.stored_size")
            .parse()
            .expect("number");
        stored_total += stored;
        let blocks = fs::metadata(&p).expect("stat").blocks();
        assert_eq!(
            blocks,
            (stored + 16).div_ceil(512),
            "{name}: {stored} bytes stored"
        );
        // A compact header: a 1200-byte English text takes well under 400 bytes.
        if name.ends_with(".txt") {
            assert!(stored < 400, "{name}: {stored} bytes");
        }
    }
    let on_disk = disk_bytes(&packs);
    assert!(
        on_disk < files.len() as u64 * 4096 / 2,
        "{on_disk} bytes of packs for {} files ({stored_total} bytes stored)",
        files.len()
    );
    admin("evict", &mnt);
    read_all(&mnt, &files, "through the decompressor");
    d.unmount();
    let (code, out) = fsck(&["--deep"], &backing);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("4 files share their blob"), "{out}");

    // Most files deleted: the sealed pack is mostly dead bytes; `compact` copies the
    // live blobs into a new pack and deletes the old one.
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    for name in ["t0.txt", "copy0.txt", "t2.txt", "t3.txt", "t4.txt"] {
        fs::remove_file(mnt.join(name)).expect("rm");
    }
    files.retain(|(n, _)| {
        !["t0.txt", "copy0.txt", "t2.txt", "t3.txt", "t4.txt"].contains(&n.as_str())
    });
    let live_before = status_field(&mnt, "pack_live_bytes");
    let len_before = lengths(&pack_files(&backing));
    let out = admin("compact", &mnt);
    println!("{}", String::from_utf8_lossy(&out.stdout));
    // The reaper deletes the old pack file within a second or two.
    std::thread::sleep(Duration::from_secs(3));
    // (Both packs are under a block here: lengths show it, blocks would not.)
    assert_eq!(status_field(&mnt, "pack_live_bytes"), live_before);
    let len_after = lengths(&pack_files(&backing));
    assert!(
        len_after < len_before,
        "compaction gave nothing back: {len_before} -> {len_after} bytes of packs"
    );
    assert!(
        d.log_text().contains("1 packs compacted"),
        "{}",
        d.log_text()
    );
    admin("evict", &mnt);
    read_all(&mnt, &files, "after compaction");
    // A copy written now still shares the moved blob (its content hint was moved too).
    fs::write(mnt.join("copy1b.txt"), &files[0].1).expect("write");
    let shared = status_field(&mnt, "shared_files");
    admin("flush", &mnt);
    assert_eq!(status_field(&mnt, "shared_files"), shared + 1);
    files.push(("copy1b.txt".into(), files[0].1.clone()));
    d.unmount();
    let (code, out) = fsck(&["--deep"], &backing);
    assert_eq!(code, 0, "{out}");

    // A damaged packed blob: its file gives EIO, every other file reads; fsck names it.
    let victim = {
        let store = nacrithfs::store::Store::open_existing(&backing).expect("open");
        let (ino, blob) = store
            .inodes()
            .filter_map(|r| r.ok())
            .find_map(|(ino, i)| {
                i.blob
                    .filter(|_| i.size == 1200)
                    .filter(|b| {
                        b.pack
                            .is_some_and(|s| store.slot_refs(s).expect("refs").len() == 1)
                    })
                    .map(|b| (ino, b))
            })
            .expect("a packed text blob of one file");
        let slot = blob.pack.expect("packed");
        let path = store.packs().path(slot.pack);
        let mut bytes = fs::read(&path).expect("read pack");
        let at = (slot.offset + blob.stored_size - 3) as usize;
        bytes[at] ^= 0x5a;
        fs::write(&path, &bytes).expect("write pack");
        ino
    };
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    // No clean copy: every read goes through the decompressor.
    admin("evict", &mnt);
    let mut failed = Vec::new();
    for (name, data) in &files {
        let p = mnt.join(name);
        if fs::metadata(&p).expect("stat").ino() == victim {
            let err = fs::read(&p).expect_err("a damaged blob reads");
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{name}: {err}");
            failed.push(name.clone());
        } else {
            assert!(fs::read(&p).expect("read") == *data, "{name}");
        }
    }
    assert!(!failed.is_empty(), "no file has the damaged blob");
    let log = d.log_text();
    assert!(log.contains("cannot read"), "{log}");
    d.unmount();
    let (code, out) = fsck(&["--deep"], &backing);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("bad-blob"), "{out}");
}

/// A content hint naming a packed blob that nobody refers to any more (its file was
/// rewritten) is stale: a file that comes back to that content is coded, not shared
/// (the commit would refuse the share, and the retry would find the same hint: fsx
/// found 44 "committing the blob: errno 11" failures this way). No model needed:
/// binary content goes to the classical codec and is packed like any small blob.
#[test]
fn content_that_comes_back_after_its_blob_was_dropped_is_compressed_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    let first = common::random_bytes(3000, 11);
    let second = common::random_bytes(3000, 12);
    let f = mnt.join("f.bin");
    for (round, data) in [&first, &second, &first].into_iter().enumerate() {
        fs::write(&f, data).expect("write");
        admin("flush", &mnt);
        assert_eq!(
            xattr(&f, "user.nacrith.state"),
            "compressed",
            "round {round}"
        );
    }
    assert_eq!(status_field(&mnt, "failures"), 0);
    // Not shared: the only blob with that content had no reference left.
    assert_eq!(status_field(&mnt, "shared_files"), 0);
    admin("evict", &mnt);
    assert!(fs::read(&f).expect("read") == first);
    d.unmount();
    let (code, out) = fsck(&["--deep"], &backing);
    assert_eq!(code, 0, "{out}");
}

/// Pack ids come from the blob counter. A counter set back (a damaged index) must not
/// make a new pack take a live pack's number, which would replace its file: fsck finds
/// and repairs such a counter, and the daemon refuses such a pack (the file stays
/// plaintext, nothing is lost). No model needed: binary content is packed too.
#[test]
fn a_blob_counter_set_back_never_reuses_a_pack_number() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    // (random_bytes takes odd seeds: even ones give their odd neighbour's bytes.)
    let mut files: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| (format!("f{i}.bin"), common::random_bytes(2000, 101 + 2 * i)))
        .collect();
    // Four files, then one more in a mount of its own: the last pack holds its blob
    // alone and has the highest number in use (allocated after that blob's).
    for batch in [&files[..4], &files[4..]] {
        let d = Daemon::start(&backing, &mnt, PACK_OPTS);
        write_all(&mnt, batch);
        admin("flush", &mnt);
        d.unmount();
    }
    let packs_before: Vec<(PathBuf, Vec<u8>)> = pack_files(&backing)
        .into_iter()
        .map(|p| {
            let b = fs::read(&p).expect("read pack");
            (p, b)
        })
        .collect();
    let last = packs_before
        .iter()
        .filter_map(|(p, _)| {
            let name = p.file_name()?.to_str()?;
            u64::from_str_radix(name.strip_suffix(".pack")?, 16).ok()
        })
        .max()
        .expect("a pack");
    let set_counter = |n: u64| {
        let store = nacrithfs::store::Store::open_existing(&backing).expect("open");
        store
            .raw_insert(b"mnext_blob", &n.to_le_bytes())
            .expect("set the counter back");
    };
    // fsck counts pack numbers as in use.
    set_counter(last);
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains(&format!(
            "next blob number {last} is already in use (highest {last})"
        )),
        "{out}"
    );
    // The daemon, one number lower: the new blob gets it, the new pack would be
    // `last` again. It is refused; the file stays plaintext.
    set_counter(last - 1);
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    files.push(("g.bin".into(), common::random_bytes(2000, 201)));
    fs::write(mnt.join("g.bin"), &files[5].1).expect("write");
    let _ = admin_raw("flush", &mnt);
    let log = d.log_text();
    assert!(log.contains("already in use"), "{log}");
    assert_eq!(xattr(&mnt.join("g.bin"), "user.nacrith.state"), "dirty");
    admin("evict", &mnt);
    read_all(&mnt, &files, "with the counter set back");
    d.unmount();
    for (p, bytes) in &packs_before {
        assert!(
            fs::read(p).ok().as_ref() == Some(bytes),
            "{} was changed",
            p.display()
        );
    }
    let (code, out) = fsck(&["--repair"], &backing);
    assert_ne!(code, 4, "{out}");
    // Repaired (or already moved on): new packs get new numbers.
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    admin("flush", &mnt);
    assert_eq!(
        xattr(&mnt.join("g.bin"), "user.nacrith.state"),
        "compressed"
    );
    admin("evict", &mnt);
    read_all(&mnt, &files, "after the repair");
    d.unmount();
    let (code, out) = fsck(&["--deep"], &backing);
    assert_eq!(code, 0, "{out}");
}

/// A reference key naming an inode that does not hold that blob (a damaged index) made
/// every compaction pass copy the pack's live blobs again, then fail its commit: dead
/// bytes added to the open pack every few minutes. Such a pack is now left as it is,
/// with one error naming fsck, which repairs it; then it is compacted. No model needed.
#[test]
fn a_stale_reference_stops_compaction_of_its_pack_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("f{i}.bin"), common::random_bytes(3000, 301 + 2 * i)))
        .collect();
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    write_all(&mnt, &files);
    admin("flush", &mnt);
    let kept = "f0.bin";
    let kept_ino = fs::metadata(mnt.join(kept)).expect("stat").ino();
    d.unmount();
    {
        let store = nacrithfs::store::Store::open_existing(&backing).expect("open");
        let inode = store.get(kept_ino).expect("get").expect("inode");
        let blob = inode.blob.expect("compressed");
        let slot = blob.pack.expect("packed");
        let mut key = vec![b'R'];
        key.extend_from_slice(&slot.pack.to_be_bytes());
        key.extend_from_slice(&slot.offset.to_be_bytes());
        key.extend_from_slice(&999_999u64.to_be_bytes());
        store
            .raw_insert(&key, &blob.stored_size.to_le_bytes())
            .expect("plant a stale reference");
    }
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    for (name, _) in &files[1..] {
        fs::remove_file(mnt.join(name)).expect("rm");
    }
    three_compactions_do_not_grow_the_packs(&backing, &mnt);
    let log = d.log_text();
    assert!(log.contains("has a stale reference"), "{log}");
    admin("evict", &mnt);
    read_all(&mnt, &files[..1], "with a stale reference");
    d.unmount();
    let (code, out) = fsck(&["--repair"], &backing);
    println!("{out}");
    assert_ne!(code, 0, "fsck found nothing: {out}");
    assert_ne!(code, 4, "{out}");
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    let out = admin("compact", &mnt);
    println!("{}", String::from_utf8_lossy(&out.stdout));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        d.log_text().contains("1 packs compacted"),
        "{}",
        d.log_text()
    );
    admin("evict", &mnt);
    read_all(&mnt, &files[..1], "after the repair and compaction");
    d.unmount();
    let (code, out) = fsck(&["--deep"], &backing);
    assert_eq!(code, 0, "{out}");
}

/// One coding profile whose stored value does not decode kept the whole volume from
/// opening, a mount and `fsck --repair` alike. Now the volume mounts (the packs of that
/// profile give an error, logged), and `fsck --repair` restores the profile from a pack
/// header, which carries it whole. No model needed.
#[test]
fn an_undecodable_profile_is_restored_from_a_pack_header() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let files: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("f{i}.bin"), common::random_bytes(2000, 301 + 2 * i)))
        .collect();
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    write_all(&mnt, &files);
    admin("flush", &mnt);
    admin("evict", &mnt);
    d.unmount();
    assert!(!pack_files(&backing).is_empty(), "nothing was packed");
    {
        let store = nacrithfs::store::Store::open_existing(&backing).expect("open");
        store
            .raw_insert(b"P\0\0\0\x01", b"\xff\xff\xff")
            .expect("damage profile 1");
    }
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    let log = d.log_text();
    assert!(log.contains("coding profile 1 does not decode"), "{log}");
    assert!(
        fs::read(mnt.join("f0.bin")).is_err(),
        "a blob of an unknown profile was read"
    );
    d.unmount();
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("unknown-profile"), "{out}");
    let (code, out) = fsck(&["--repair"], &backing);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("restored from the pack's header"), "{out}");
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 0, "{out}");
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    read_all(&mnt, &files, "after the repair");
    d.unmount();
}

/// `stored_disk_bytes` (and `disk_bytes`) count a packed blob once however many equal
/// files share it: a second copy of a stored file adds nothing to what the disk holds,
/// and the status says so (it added the blob again per file). No model needed.
#[test]
fn a_shared_packed_blob_is_counted_once_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let data = common::random_bytes(3000, 401);
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    fs::write(mnt.join("a.bin"), &data).expect("write");
    admin("flush", &mnt);
    admin("evict", &mnt);
    let before = status_field(&mnt, "stored_disk_bytes");
    let packs = status_field(&mnt, "pack_disk_bytes");
    assert!(packs > 0, "nothing was packed");
    fs::write(mnt.join("copy.bin"), &data).expect("write the copy");
    admin("flush", &mnt);
    admin("evict", &mnt);
    assert_eq!(
        status_field(&mnt, "shared_files"),
        1,
        "the copy was not shared"
    );
    assert_eq!(status_field(&mnt, "pack_disk_bytes"), packs);
    assert_eq!(
        status_field(&mnt, "stored_disk_bytes"),
        before,
        "a shared blob counted twice"
    );
    assert_eq!(fs::read(mnt.join("copy.bin")).expect("read"), data);
    d.unmount();
}

/// A pack with one damaged blob is left as it is, with nothing copied: compaction used
/// to copy the blobs before the damaged one, then give up, leaving those copies as dead
/// bytes in the open pack, again at every pass. No model needed.
#[test]
fn a_damaged_blob_stops_compaction_before_anything_is_copied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("f{i}.bin"), common::random_bytes(3000, 501 + 2 * i)))
        .collect();
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    write_all(&mnt, &files);
    admin("flush", &mnt);
    let inos: Vec<u64> = ["f0.bin", "f5.bin"]
        .iter()
        .map(|n| fs::metadata(mnt.join(n)).expect("stat").ino())
        .collect();
    d.unmount();
    // The kept blob at the higher offset gets a damaged compact header.
    let slots: Vec<_> = {
        let store = nacrithfs::store::Store::open_existing(&backing).expect("open");
        inos.iter().map(|&ino| packed_slot(&store, ino)).collect()
    };
    assert_eq!(slots[0].pack, slots[1].pack, "one pack for all six");
    let last = *slots.iter().max_by_key(|s| s.offset).expect("two");
    let pack = pack_files(&backing)
        .into_iter()
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()) == Some(&format!("{:016x}.pack", last.pack))
        })
        .expect("the pack file");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pack)
            .expect("open the pack");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, last.offset + 8).expect("read");
        f.write_all_at(&[b[0] ^ 0xff], last.offset + 8)
            .expect("damage");
    }
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    for (name, _) in &files[1..5] {
        fs::remove_file(mnt.join(name)).expect("rm");
    }
    three_compactions_do_not_grow_the_packs(&backing, &mnt);
    let log = d.log_text();
    assert!(log.contains("cannot be copied"), "{log}");
    d.unmount();
}

/// The small packs an unmount seals (one per coding profile: text, binary) are not
/// copied into new packs at the next mount: merging needs two small packs of one
/// profile. It used to copy both at every mount, for nothing.
#[test]
fn small_packs_of_different_profiles_are_left_alone() {
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    let files: Vec<(String, Vec<u8>)> = vec![
        ("a.txt".into(), common::english(1500)),
        ("b.txt".into(), common::english(1200)[200..].to_vec()),
        ("c.bin".into(), common::random_bytes(2000, 701)),
        ("d.bin".into(), common::random_bytes(2000, 703)),
    ];
    write_all(&mnt, &files);
    admin("flush", &mnt);
    d.unmount();
    let packs = pack_files(&backing);
    assert_eq!(packs.len(), 2, "one pack per profile: {packs:?}");
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    let _ = admin_raw("compact", &mnt);
    let log = d.log_text();
    assert!(!log.contains("packs compacted"), "{log}");
    assert_eq!(pack_files(&backing), packs);
    admin("evict", &mnt);
    read_all(&mnt, &files, "after a compaction pass");
    d.unmount();
}

/// A sealed pack holding one small blob and nothing dead is left where it is: its
/// header (the coding profile) is not dead space. It used to count as dead, so such a
/// pack (here an empty file's blob, ~40 bytes in a 126-byte pack, sealed by the
/// unmount) was copied into the open pack at every pass that found it sealed, once per
/// mount (this test failed so before the fix). No model needed.
#[test]
fn a_sealed_pack_of_one_small_blob_is_not_copied_again_and_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let tiny = vec![("empty.txt".to_string(), Vec::new())];
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    fs::write(mnt.join(&tiny[0].0), &tiny[0].1).expect("write");
    admin("flush", &mnt);
    d.unmount();
    let packs = pack_files(&backing);
    assert_eq!(packs.len(), 1, "{packs:?}");
    for pass in 0..2 {
        let d = Daemon::start(&backing, &mnt, PACK_OPTS);
        let _ = admin_raw("compact", &mnt);
        let log = d.log_text();
        assert!(!log.contains("packs compacted"), "pass {pass}: {log}");
        admin("evict", &mnt);
        read_all(&mnt, &tiny, "after a compaction pass");
        d.unmount();
        assert_eq!(pack_files(&backing), packs, "pass {pass}");
    }
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 0, "{out}");
}

/// A pack's index entry that names another coding profile than the pack's header
/// (a damaged index) stops compaction of that pack: its text blobs, coded with the
/// header's profile (the model's), would have been copied into the open pack of the
/// entry's (here the binary files' profile) and not decoded there. fsck reports it and
/// `--repair` sets the entry from the header; compaction then goes on.
#[test]
fn a_pack_entry_with_another_profile_than_its_header_is_not_compacted() {
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let text = common::english(6000);
    let mut files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            (
                format!("t{i}.txt"),
                text[i * 1400..i * 1400 + 1200].to_vec(),
            )
        })
        .collect();
    files.push(("b.bin".into(), common::random_bytes(2000, 1301)));
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    write_all(&mnt, &files);
    admin("flush", &mnt);
    let kept = fs::metadata(mnt.join("t0.txt")).expect("stat").ino();
    let binary = fs::metadata(mnt.join("b.bin")).expect("stat").ino();
    for name in ["t1.txt", "t2.txt", "t3.txt"] {
        fs::remove_file(mnt.join(name)).expect("rm");
    }
    files.retain(|(n, _)| n == "t0.txt" || n == "b.bin");
    d.unmount();
    let packs = pack_files(&backing);
    assert_eq!(packs.len(), 2, "one pack per profile: {packs:?}");
    {
        let store = nacrithfs::store::Store::open_existing(&backing).expect("open");
        let (text_pack, binary_pack) = (
            packed_slot(&store, kept).pack,
            packed_slot(&store, binary).pack,
        );
        let info = |id: u64| store.pack_info(id).expect("entry").expect("an entry");
        let mut entry = info(text_pack);
        let other = info(binary_pack).profile;
        assert_ne!(entry.profile, other, "text and binary share a profile");
        entry.profile = other;
        let mut key = vec![b'k'];
        key.extend_from_slice(&text_pack.to_be_bytes());
        store
            .raw_insert(&key, &entry.encode())
            .expect("name the other profile");
    }
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    let _ = admin_raw("compact", &mnt);
    let log = d.log_text();
    assert!(log.contains("of coding profile"), "{log}");
    assert!(!log.contains("packs compacted"), "{log}");
    assert_eq!(pack_files(&backing), packs);
    admin("evict", &mnt);
    read_all(&mnt, &files, "after a refused compaction");
    d.unmount();
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("pack-profile"), "{out}");
    let (code, out) = fsck(&["--repair"], &backing);
    assert_eq!(code, 1, "{out}");
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 0, "{out}");
    compact_one_pack_and_read(&backing, &mnt, &files, "after the repair and compaction");
    let (code, out) = fsck(&["--deep"], &backing);
    assert_eq!(code, 0, "{out}");
}

/// The index's copy of a coding profile replaced by another valid profile (here the
/// binary files' profile entry holding the text profile): fsck reports
/// `profile-contents` (no repair: which copy is right is not for it to guess), reads of
/// that pack's files fail with EIO instead of decoding with the wrong profile, and
/// compaction leaves the pack alone (it would have written the copies' pack header from
/// the index's copy and deleted the only header saying how they were coded).
#[test]
fn a_profile_whose_index_copy_differs_from_the_pack_header_is_reported_and_left_alone() {
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let text = common::english(1500);
    let mut files: Vec<(String, Vec<u8>)> = vec![("t.txt".into(), text[..1200].to_vec())];
    files.extend((0..4).map(|i| (format!("b{i}.bin"), common::random_bytes(2000, 1701 + i))));
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    write_all(&mnt, &files);
    admin("flush", &mnt);
    let (t, b) = (
        fs::metadata(mnt.join("t.txt")).expect("stat").ino(),
        fs::metadata(mnt.join("b0.bin")).expect("stat").ino(),
    );
    for name in ["b1.bin", "b2.bin", "b3.bin"] {
        fs::remove_file(mnt.join(name)).expect("rm");
    }
    files.retain(|(n, _)| n == "t.txt" || n == "b0.bin");
    d.unmount();
    let packs = pack_files(&backing);
    assert_eq!(packs.len(), 2, "one pack per profile: {packs:?}");
    let profile_key = |id: u32| {
        let mut k = vec![b'P'];
        k.extend_from_slice(&id.to_be_bytes());
        k
    };
    let (binary_key, binary_value) = {
        let store = nacrithfs::store::Store::open_existing(&backing).expect("open");
        let profile_of = |ino: u64| {
            let pack = packed_slot(&store, ino).pack;
            store
                .pack_info(pack)
                .expect("entry")
                .expect("an entry")
                .profile
        };
        let (text_profile, binary_profile) = (profile_of(t), profile_of(b));
        assert_ne!(text_profile, binary_profile);
        let entries = store.raw_entries().expect("entries");
        let value = |key: &[u8]| {
            entries
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .expect("a profile entry")
        };
        let (binary_key, text_key) = (profile_key(binary_profile), profile_key(text_profile));
        let binary_value = value(&binary_key);
        store
            .raw_insert(&binary_key, &value(&text_key))
            .expect("replace the binary profile's copy");
        (binary_key, binary_value)
    };
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("profile-contents"), "{out}");
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    let _ = admin_raw("compact", &mnt);
    let log = d.log_text();
    assert!(!log.contains("packs compacted"), "{log}");
    assert!(log.contains("other contents than the index"), "{log}");
    admin("evict", &mnt);
    let e = fs::read(mnt.join("b0.bin")).expect_err("decoded with another profile");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    read_all(&mnt, &files[..1], "beside a pack of a damaged profile");
    d.unmount();
    assert_eq!(pack_files(&backing), packs);
    {
        let store = nacrithfs::store::Store::open_existing(&backing).expect("open");
        store
            .raw_insert(&binary_key, &binary_value)
            .expect("put the profile back");
    }
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 0, "{out}");
    compact_one_pack_and_read(
        &backing,
        &mnt,
        &files,
        "with the profile put back and compacted",
    );
}

/// Two pack files swapped (each under the other's name): fsck names both (`pack-id`,
/// left to a person: which file is which is not for it to guess), their files' reads
/// fail with EIO rather than return another file's bytes, and compaction leaves both
/// where they are. No model needed.
#[test]
fn pack_files_under_each_others_names_are_reported_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let batch = |tag: &str, seed: u64| -> Vec<(String, Vec<u8>)> {
        (0..4)
            .map(|i| {
                (
                    format!("{tag}{i}.bin"),
                    common::random_bytes(2000, seed + i),
                )
            })
            .collect()
    };
    let (a, b) = (batch("a", 1501), batch("b", 1601));
    for files in [&a, &b] {
        let d = Daemon::start(&backing, &mnt, PACK_OPTS);
        write_all(&mnt, files);
        admin("flush", &mnt);
        d.unmount();
    }
    let packs = pack_files(&backing);
    assert_eq!(packs.len(), 2, "{packs:?}");
    let (first, second) = (
        fs::read(&packs[0]).expect("read"),
        fs::read(&packs[1]).expect("read"),
    );
    fs::write(&packs[0], &second).expect("swap");
    fs::write(&packs[1], &first).expect("swap");
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 4, "{out}");
    assert_eq!(out.matches("pack-id").count(), 2, "{out}");
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    for name in ["a1.bin", "a2.bin", "a3.bin", "b1.bin", "b2.bin", "b3.bin"] {
        fs::remove_file(mnt.join(name)).expect("rm");
    }
    let _ = admin_raw("compact", &mnt);
    let log = d.log_text();
    assert!(!log.contains("packs compacted"), "{log}");
    assert!(log.contains("says it is pack"), "{log}");
    admin("evict", &mnt);
    for name in ["a0.bin", "b0.bin"] {
        let e = fs::read(mnt.join(name)).expect_err("a file read from the wrong pack");
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{name}: {e}");
    }
    d.unmount();
    // Put back, everything reads again.
    fs::write(&packs[0], &first).expect("restore");
    fs::write(&packs[1], &second).expect("restore");
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    read_all(
        &mnt,
        &[a[0].clone(), b[0].clone()],
        "with the packs restored",
    );
    d.unmount();
}

/// An inode record that cannot be read stops compaction of the pack it refers into
/// only: later packs are still compacted (the pass used to end there, every time, for
/// every pack after it). No model needed.
#[test]
fn an_unreadable_inode_record_stops_compaction_of_its_pack_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let batch = |tag: &str, seed: u64| -> Vec<(String, Vec<u8>)> {
        (0..6)
            .map(|i| {
                (
                    format!("{tag}{i}.bin"),
                    common::random_bytes(3000, seed + 2 * i),
                )
            })
            .collect()
    };
    let (a, b) = (batch("a", 801), batch("b", 901));
    // Two sealed packs, one per mount: a's, then b's.
    for files in [&a, &b] {
        let d = Daemon::start(&backing, &mnt, PACK_OPTS);
        write_all(&mnt, files);
        admin("flush", &mnt);
        d.unmount();
    }
    assert_eq!(pack_files(&backing).len(), 2);
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    let damaged = fs::metadata(mnt.join("a1.bin")).expect("stat").ino();
    for name in ["a2", "a3", "a4", "a5", "b1", "b2", "b3", "b4", "b5"] {
        fs::remove_file(mnt.join(format!("{name}.bin"))).expect("rm");
    }
    d.unmount();
    {
        let store = nacrithfs::store::Store::open_existing(&backing).expect("open");
        let mut key = vec![b'i'];
        key.extend_from_slice(&damaged.to_be_bytes());
        store
            .raw_insert(&key, b"\xff\xff")
            .expect("damage an inode record");
    }
    let d = Daemon::start(&backing, &mnt, PACK_OPTS);
    let _ = admin_raw("compact", &mnt);
    std::thread::sleep(Duration::from_secs(2));
    let log = d.log_text();
    assert!(log.contains("whose record cannot be read"), "{log}");
    assert!(log.contains("1 packs compacted"), "{log}");
    admin("evict", &mnt);
    read_all(&mnt, &[a[0].clone(), b[0].clone()], "after compaction");
    d.unmount();
}

/// Solid groups (issue 15, part 4): small files flushed together are coded as one
/// chunk in one packed blob; each reads back alone through the decompressor (a
/// read-write and a read-only mount; one decode of a group gives all its members), a
/// copy of a member shares its range, `du` and
/// the stored size count a member's share, fsck --deep decodes the group and checks
/// every member's range, and a deleted member leaves the others readable.
#[test]
fn small_files_are_coded_in_solid_groups_and_read_back_alone() {
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let text = common::english(12_000);
    let mut files: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            (
                format!("g{i}.txt"),
                text[i * 1700..i * 1700 + 1000 + 150 * i].to_vec(),
            )
        })
        .collect();
    files.push(("empty.txt".into(), Vec::new()));
    files.push(("r.bin".into(), common::random_bytes(700, 9)));
    write_all(&mnt, &files);
    admin("flush", &mnt);
    let grouped = status_field(&mnt, "grouped_files");
    assert!(grouped >= 5, "{grouped} files were grouped");
    assert!(files_under(&backing, "blobs").is_empty());
    // One group: the members share one slot, each counting its share.
    let mut stored_total = 0;
    for (name, data) in &files {
        let p = mnt.join(name);
        assert_eq!(xattr(&p, "user.nacrith.state"), "compressed", "{name}");
        let stored: u64 = xattr(&p, "user.nacrith.stored_size")
            .parse()
            .expect("number");
        stored_total += stored;
        if name.ends_with(".txt") && !data.is_empty() {
            assert!(stored < data.len() as u64 / 3, "{name}: {stored} bytes");
        }
        let blocks = fs::metadata(&p).expect("stat").blocks();
        assert!(
            blocks * 512 <= data.len() as u64 + 512,
            "{name}: {blocks} blocks"
        );
    }
    let plain: usize = files.iter().map(|(_, d)| d.len()).sum();
    assert!(
        (stored_total as usize) < plain / 3,
        "{stored_total} bytes stored for {plain}"
    );
    admin("evict", &mnt);
    // The binary file is not a member (see below): its own blob.
    let (bin, data) = files.last().expect("files");
    let before = status_field(&mnt, "regions_decoded");
    assert!(
        fs::read(mnt.join(bin)).expect("read") == *data,
        "{bin} differs"
    );
    let bin_regions = status_field(&mnt, "regions_decoded") - before;
    // A member alone, through the decompressor: its group is decoded once, and the
    // other members come with it (reading them decodes nothing more).
    let (member, data) = &files[4];
    let before = status_field(&mnt, "regions_decoded");
    assert!(
        fs::read(mnt.join(member)).expect("read") == *data,
        "{member} differs"
    );
    let regions = status_field(&mnt, "regions_decoded");
    let group_regions = regions - before;
    assert!(group_regions > 0);
    read_all(&mnt, &files, "after one member's group was decoded");
    assert_eq!(
        status_field(&mnt, "regions_decoded"),
        regions,
        "the group was decoded again for another member"
    );
    // Readers of every member at once: the group is decoded once for all of them.
    admin("evict", &mnt);
    std::thread::scope(|s| {
        for (name, data) in &files {
            let mnt = &mnt;
            s.spawn(move || {
                let got = fs::read(mnt.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(got == *data, "{name} differs (concurrent readers)");
            });
        }
    });
    assert_eq!(
        status_field(&mnt, "regions_decoded") - regions,
        group_regions + bin_regions,
        "concurrent readers of one group decoded it more than once"
    );
    admin("evict", &mnt);
    assert!(
        fs::read(mnt.join("g2.txt")).expect("read") == files[2].1,
        "g2.txt differs"
    );
    // A copy of a member shares its range: no model time.
    let coded = status_field(&mnt, "symbols_coded");
    fs::write(mnt.join("copy2.txt"), &files[2].1).expect("write");
    files.push(("copy2.txt".into(), files[2].1.clone()));
    admin("flush", &mnt);
    assert_eq!(status_field(&mnt, "shared_files"), 1);
    assert!(
        status_field(&mnt, "symbols_coded") - coded < 50,
        "the copy was coded"
    );
    admin("evict", &mnt);
    read_all(&mnt, &files, "through the decompressor");
    d.unmount();
    let (code, out) = fsck(&["--deep"], &backing);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 files share their blob"), "{out}");

    // Read-only: a member decodes into the private temp directory.
    let d = Daemon::start(&backing, &mnt, "ro");
    read_all(&mnt, &files, "on a read-only mount");
    d.unmount();

    // The binary file was flushed with the texts but not grouped with them: coded
    // alone it needs no model, so it reads while the model is gone; the texts do not.
    let model = common::model_copy(dir.path());
    let d = Daemon::start(
        &backing,
        &mnt,
        &format!("idle=3600,model={}", model.display()),
    );
    admin("evict", &mnt);
    fs::remove_file(&model).expect("remove model");
    let bin = &files.iter().find(|(n, _)| n == "r.bin").expect("r.bin").1;
    let got =
        fs::read(mnt.join("r.bin")).unwrap_or_else(|e| panic!("r.bin without the model: {e}"));
    assert!(got == *bin, "r.bin differs");
    let err = fs::read(mnt.join("g1.txt")).expect_err("a text member read without the model");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    d.unmount();

    // Deleting members leaves the others readable (and the slot referenced).
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    for name in ["g0.txt", "g3.txt", "copy2.txt"] {
        fs::remove_file(mnt.join(name)).expect("rm");
        files.retain(|(n, _)| n != name);
    }
    admin("evict", &mnt);
    read_all(&mnt, &files, "after members were deleted");
    // Compaction keeps the group's slot whole (the members left refer to it), and
    // copies nothing: no pack is under half referenced (the empty file's pack, mostly
    // header, used to be copied at every pass).
    three_compactions_do_not_grow_the_packs(&backing, &mnt);
    assert!(
        !d.log_text().contains("packs compacted"),
        "{}",
        d.log_text()
    );
    admin("evict", &mnt);
    read_all(&mnt, &files, "after a compaction");
    d.unmount();
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    read_all(&mnt, &files, "after a remount");
    d.unmount();
    let (code, out) = fsck(&["--deep"], &backing);
    assert_eq!(code, 0, "{out}");

    // A member rewritten is coded again (alone or in a new group) and the old range
    // stays for the others.
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let new = text[9000..10_500].to_vec();
    fs::write(mnt.join("g1.txt"), &new).expect("rewrite");
    for f in files.iter_mut().filter(|(n, _)| n == "g1.txt") {
        f.1 = new.clone();
    }
    admin("flush", &mnt);
    admin("evict", &mnt);
    read_all(&mnt, &files, "after a member was rewritten");
    d.unmount();
    let (code, out) = fsck(&["--deep"], &backing);
    assert_eq!(code, 0, "{out}");
}

/// A member whose group decodes but whose range is not the content its record names
/// (the record's BLAKE3 tail damaged) fails with EIO, alone: its group's other members
/// read, and fsck --deep names it.
#[test]
fn a_member_whose_range_does_not_match_its_record_fails_alone() {
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let text = common::english(6000);
    let a = text[0..900].to_vec();
    let b = text[1000..1800].to_vec();
    fs::write(mnt.join("a.txt"), &a).expect("write");
    fs::write(mnt.join("b.txt"), &b).expect("write");
    admin("flush", &mnt);
    assert_eq!(status_field(&mnt, "grouped_files"), 2);
    let ino = fs::metadata(mnt.join("a.txt")).expect("stat").ino();
    admin("evict", &mnt);
    d.unmount();
    {
        let store = nacrithfs::store::Store::open_existing(&backing).expect("open");
        let mut inode = store.get(ino).expect("get").expect("inode");
        let mut blob = inode.blob.expect("blob");
        let m = blob.member.as_mut().expect("a member");
        m.tail[0] ^= 1;
        inode.blob = Some(blob);
        let mut txn = nacrithfs::store::Txn::default();
        txn.put_inode(ino, &inode);
        store.commit(txn, true).expect("commit");
    }
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let err = fs::read(mnt.join("a.txt")).expect_err("a damaged member read");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(fs::read(mnt.join("b.txt")).expect("b"), b);
    d.unmount();
    let (code, out) = fsck(&["--deep"], &backing);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("are not the file the index names"), "{out}");
}
