//! Scale and load on real mounts: many files in one directory listed while others come
//! and go, renames across directories, a storm of O_APPEND writes from several
//! processes, writes that cost no index batch, and the watchdog that ends a daemon whose
//! index hangs. Timings are the benchmarks' business (scripts/bench-meta); these check
//! results.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mount::*;

/// Create `names` in `dir` (empty files), from `threads` threads.
fn create_many(dir: &Path, names: &[String], threads: usize) {
    std::thread::scope(|s| {
        for part in names.chunks(names.len().div_ceil(threads)) {
            s.spawn(move || {
                for n in part {
                    fs::File::create(dir.join(n)).unwrap_or_else(|e| panic!("create {n}: {e}"));
                }
            });
        }
    });
}

/// 20,000 names in one directory; a listing made while other names are created and
/// removed returns every name that existed throughout exactly once, and no name twice;
/// renames across directories move exactly what they name.
#[test]
fn twenty_thousand_files_listed_while_others_come_and_go() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let big = mnt.join("big");
    fs::create_dir(&big).expect("mkdir");
    let stable: Vec<String> = (0..20_000).map(|i| format!("stable-{i:05}")).collect();
    let doomed: Vec<String> = (0..2_000).map(|i| format!("doomed-{i:05}")).collect();
    let t = Instant::now();
    create_many(&big, &stable, 2);
    create_many(&big, &doomed, 2);
    println!("created 22,000 files in {:.1} s", t.elapsed().as_secs_f64());

    // Churn while listing: new names appear, doomed ones go.
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (big, stop, doomed) = (big.clone(), stop.clone(), doomed.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            let mut doomed = doomed.into_iter();
            while !stop.load(Ordering::Relaxed) {
                fs::File::create(big.join(format!("new-{i:05}"))).expect("create during listing");
                if let Some(n) = doomed.next() {
                    fs::remove_file(big.join(n)).expect("unlink during listing");
                }
                i += 1;
            }
            i
        })
    };
    let mut listings = 0;
    while listings < 3 {
        let mut seen: BTreeMap<String, u32> = BTreeMap::new();
        for e in fs::read_dir(&big).expect("read_dir") {
            let name = e.expect("entry").file_name().into_string().expect("utf-8");
            *seen.entry(name).or_default() += 1;
        }
        let twice: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
        assert!(
            twice.is_empty(),
            "names listed twice: {:?}",
            &twice[..twice.len().min(10)]
        );
        let missing: Vec<_> = stable.iter().filter(|n| !seen.contains_key(*n)).collect();
        assert!(
            missing.is_empty(),
            "{} names that existed throughout were not listed, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        listings += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let created = churn.join().expect("churn thread");
    assert!(
        created > 0,
        "the churn thread made nothing while the listings ran"
    );
    println!("3 listings of ~22,000 names with {created} creates and as many unlinks meanwhile");

    // Renames across directories: the moved names leave one and arrive in the other.
    let other = mnt.join("other");
    fs::create_dir(&other).expect("mkdir other");
    for n in &stable[..1000] {
        fs::rename(big.join(n), other.join(n)).expect("rename across directories");
    }
    let in_other: BTreeSet<String> = fs::read_dir(&other)
        .expect("read other")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    let expected: BTreeSet<String> = stable[..1000].iter().cloned().collect();
    assert_eq!(in_other, expected);
    let in_big: BTreeSet<String> = fs::read_dir(&big)
        .expect("read big")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .filter(|n| n.starts_with("stable-"))
        .collect();
    let rest: BTreeSet<String> = stable[1000..].iter().cloned().collect();
    assert_eq!(in_big, rest);

    // And all of it after a remount, from the index alone.
    d.unmount();
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    assert_eq!(fs::read_dir(&other).expect("read other").count(), 1000);
    let names = fs::read_dir(&big).expect("read big").count();
    assert_eq!(
        names,
        19_000 + created + doomed.len() - created.min(doomed.len())
    );
    d.unmount();
    let (code, text) = fsck(&[], &backing);
    assert_eq!(code, 0, "fsck after 20,000 files:\n{text}");
}

/// Eight processes each append 10,000 numbered lines to one file with O_APPEND, one
/// write(2) per line: every line is there exactly once, whole, after a remount.
#[test]
fn eight_processes_appending_ten_thousand_lines_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let log = mnt.join("appended.log");
    fs::File::create(&log).expect("create");
    let commits_before = status_field(&mnt, "index_commits");
    let t = Instant::now();
    let children: Vec<_> = (0..8)
        .map(|p| {
            // bash's echo is one write(2) per line on an O_APPEND descriptor.
            Command::new("bash")
                .arg("-c")
                .arg(format!(
                    "exec 3>>'{}' && for i in $(seq 1 10000); do echo \"proc {p} line $i\" >&3; done",
                    log.display()
                ))
                .spawn()
                .expect("bash")
        })
        .collect();
    for mut c in children {
        let status = c.wait().expect("wait");
        assert!(status.success(), "an appender failed: {status}");
    }
    let secs = t.elapsed().as_secs_f64();
    let commits = status_field(&mnt, "index_commits") - commits_before;
    println!(
        "80,000 appends from 8 processes in {secs:.1} s ({:.0}/s), {commits} index commits",
        80_000.0 / secs
    );
    d.unmount();
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let text = fs::read_to_string(&log).expect("read back");
    let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
    for line in text.lines() {
        *seen.entry(line).or_default() += 1;
    }
    for p in 0..8 {
        for i in 1..=10_000 {
            let line = format!("proc {p} line {i}");
            assert_eq!(
                seen.get(line.as_str()).copied(),
                Some(1),
                "{line:?} is not there exactly once"
            );
        }
    }
    assert_eq!(seen.len(), 80_000, "lines that no process wrote");
    assert_eq!(text.len() as u64, fs::metadata(&log).expect("stat").len());
    d.unmount();
}

/// A write(2) to a file that is already dirty commits no index batch: its size and times
/// wait in memory (stat sees them at once) and reach the index at close, fsync or the
/// group commit, so a remount finds them.
#[test]
fn writes_to_a_dirty_file_commit_no_index_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let path = mnt.join("f.txt");
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("create");
    f.write_all(b"first line\n").expect("write");
    let before = status_field(&mnt, "index_commits");
    let t = Instant::now();
    let mut expected = b"first line\n".to_vec();
    for i in 0..5000 {
        let line = format!("line {i}\n");
        f.write_all(line.as_bytes()).expect("write");
        expected.extend_from_slice(line.as_bytes());
        if i % 1000 == 0 {
            // stat (through the daemon: FUSE attributes are not cached here) sees the
            // new size before any commit.
            assert_eq!(
                fs::metadata(&path).expect("stat").len(),
                expected.len() as u64
            );
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let commits = status_field(&mnt, "index_commits") - before;
    // Group commits: one a second at most, and nothing else.
    let allowed = 2 + secs.ceil() as u64;
    assert!(
        commits <= allowed,
        "5000 writes to a dirty file made {commits} index commits in {secs:.1} s (at most {allowed} group commits expected)"
    );
    assert_eq!(
        fs::metadata(&path).expect("stat").len(),
        expected.len() as u64
    );
    drop(f);
    d.unmount();
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    assert_eq!(fs::read(&path).expect("read back"), expected);
    d.unmount();
}

/// An index call that does not return (fault injection: every index call hangs while a
/// trigger file exists) ends the daemon within the index timeout plus a second, with a
/// fatal log line and exit status 70; the next mount serves everything committed before.
#[test]
fn a_hung_index_ends_the_daemon_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let trigger = dir.path().join("stall");
    let mut d = Daemon::start_env(
        &backing,
        &mnt,
        "idle=3600,index_timeout=2",
        &[(
            "NACRITHFS_STALL_INDEX_IF",
            trigger.to_str().expect("utf-8 path"),
        )],
    );
    write_synced(&mnt.join("kept.txt"), b"written before the index hung\n");
    fs::write(&trigger, b"").expect("arm the stall");
    let started = Instant::now();
    // A request that needs the index: it hangs with it, until the daemon is gone.
    let probe = {
        let p = mnt.join("probe.txt");
        std::thread::spawn(move || fs::write(p, b"x"))
    };
    d.wait_exit("the index hung");
    let status = d.child.wait().expect("exit status");
    let log = d.log_text();
    assert_eq!(
        status.code(),
        Some(70),
        "exit status {status:?} (signal {:?}), log:\n{log}",
        status.signal()
    );
    assert!(
        log.contains("fatal: an index call") && log.contains("has not returned"),
        "no fatal line in the log:\n{log}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the watchdog took {:?}",
        started.elapsed()
    );
    fs::remove_file(&trigger).expect("disarm");
    let probe = probe.join().expect("probe thread");
    assert!(probe.is_err(), "a request succeeded on a hung index");
    d.kill9();
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    assert_eq!(
        fs::read(mnt.join("kept.txt")).expect("read after restart"),
        b"written before the index hung\n"
    );
    d.unmount();
    let (code, text) = fsck(&[], &backing);
    assert_eq!(code, 0, "fsck after the watchdog exit:\n{text}");
}

/// A daemon that stops answering though no index call hangs (its state lock held
/// forever, fault injection) stops its pings to systemd's watchdog (`WATCHDOG=1` on
/// `NOTIFY_SOCKET`), so that systemd kills and restarts it; it pinged while it answered.
#[test]
fn a_daemon_that_stops_answering_stops_its_watchdog_pings() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let trigger = dir.path().join("stall");
    let d = Daemon::start_env(
        &backing,
        &mnt,
        "idle=3600",
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().expect("utf-8 path")),
            ("WATCHDOG_USEC", "10000000"),
            (
                "NACRITHFS_STALL_LOCKED_IF",
                trigger.to_str().expect("utf-8 path"),
            ),
        ],
    );
    let pings_in = |secs: u64| {
        let end = Instant::now() + Duration::from_secs(secs);
        let mut n = 0;
        let mut buf = [0u8; 256];
        while Instant::now() < end {
            if let Ok(len) = sock.recv(&mut buf) {
                n += buf[..len]
                    .split(|&b| b == b'\n')
                    .filter(|l| *l == b"WATCHDOG=1")
                    .count();
            }
        }
        n
    };
    write_synced(&mnt.join("kept.txt"), b"written while it answered\n");
    assert!(pings_in(4) >= 2, "no watchdog pings while answering");
    fs::write(&trigger, b"").expect("arm the stall");
    // A request takes the state lock and keeps it.
    let probe = {
        let p = mnt.join("probe.txt");
        std::thread::spawn(move || fs::write(p, b"x"))
    };
    // (A ping already on its way may still come.)
    pings_in(3);
    assert_eq!(
        pings_in(5),
        0,
        "pings went on while the daemon answered nothing"
    );
    let log = d.log_text();
    assert!(log.contains("has not answered for"), "{log}");
    fs::remove_file(&trigger).expect("disarm");
    d.kill9();
    assert!(probe.join().expect("probe thread").is_err());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    assert_eq!(
        fs::read(mnt.join("kept.txt")).expect("read after restart"),
        b"written while it answered\n"
    );
    d.unmount();
}

/// A mount after a clean stop scans nothing but looks at each dirty file's plaintext
/// (O(dirty)): one shorter than the index says, or gone (what a power cut soon after
/// the stop could leave on a filesystem that had not written it back), gives the file
/// its size, so stat and read agree and the file compresses (its compression used to
/// be refused for the size mismatch, every minute, for good).
#[test]
fn a_mount_after_a_clean_stop_takes_dirty_sizes_from_the_plaintexts() {
    use std::os::unix::fs::MetadataExt;
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let text = common::english(3000);
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    write_synced(&mnt.join("short.txt"), &text);
    write_synced(&mnt.join("gone.txt"), &text);
    let ino = |name: &str| fs::metadata(mnt.join(name)).expect("stat").ino();
    let (short, gone) = (ino("short.txt"), ino("gone.txt"));
    d.unmount();
    fs::OpenOptions::new()
        .write(true)
        .open(cache_file(&backing, short))
        .expect("open the plaintext")
        .set_len(1000)
        .expect("shorten it");
    fs::remove_file(cache_file(&backing, gone)).expect("remove a plaintext");

    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let log = d.log_text();
    assert!(
        log.contains("the last stop was clean: backing files not scanned")
            && log.contains("2 dirty sizes corrected"),
        "{log}"
    );
    assert_eq!(
        fs::metadata(mnt.join("short.txt")).expect("stat").len(),
        1000
    );
    assert_eq!(fs::read(mnt.join("short.txt")).expect("read"), text[..1000]);
    assert_eq!(fs::metadata(mnt.join("gone.txt")).expect("stat").len(), 0);
    assert_eq!(fs::read(mnt.join("gone.txt")).expect("read"), b"");
    admin("flush", &mnt);
    assert_eq!(
        xattr(&mnt.join("short.txt"), "user.nacrith.state"),
        "compressed"
    );
    d.unmount();
    let (code, text) = fsck(&[], &backing);
    assert_eq!(code, 0, "{text}");
}

/// A mount after a clean unmount does not scan the backing files (a stray temp file
/// planted meanwhile stays, as the log says); a mount after kill -9 does (it goes).
#[test]
fn only_a_mount_after_a_crash_scans_the_backing_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    for i in 0..100 {
        fs::write(mnt.join(format!("f{i}")), format!("file {i}\n")).expect("write");
    }
    // Format 4: the files are in subdirectories of cache/ of 4096 inode numbers each,
    // made on first use: these 100 (inodes 2 to 101) all in the first, none in cache/.
    let top: Vec<_> = fs::read_dir(backing.join("cache"))
        .expect("cache/")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(
        top,
        vec![backing.join("cache/000000")],
        "cache/ holds {top:?}"
    );
    assert!(top.iter().all(|p| p.is_dir()), "files directly in cache/");
    let ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(mnt.join("f7")).expect("stat"));
    let plain = backing.join(format!("cache/{:06x}/{ino}", ino >> 12));
    assert_eq!(
        fs::read(&plain).expect("the cache file in its subdirectory"),
        b"file 7\n"
    );
    assert_eq!(
        fs::read_to_string(backing.join("nacrithfs.format")).expect("format marker"),
        "nacrithfs 4\n"
    );
    d.unmount();
    let stray = backing.join("cache/999999.tmp");
    fs::write(&stray, b"left by nobody").expect("plant a temp file");
    // A plaintext-looking file where format 3 keeps none: never deleted, rescued.
    let misplaced = backing.join(format!("cache/{ino}"));
    fs::write(&misplaced, b"a copy in the wrong place").expect("plant a misplaced file");
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let log = d.log_text();
    assert!(
        log.contains("the last stop was clean: backing files not scanned"),
        "no clean-stop line:\n{log}"
    );
    assert!(
        stray.exists(),
        "a mount after a clean stop swept the backing files"
    );
    assert_eq!(fs::read(mnt.join("f7")).expect("read"), b"file 7\n");
    write_synced(&mnt.join("late"), b"after the clean mount\n");
    d.kill9();
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let log = d.log_text();
    assert!(
        !log.contains("the last stop was clean"),
        "a mount after kill -9 took the stop for clean:\n{log}"
    );
    assert!(
        !stray.exists(),
        "the mount after kill -9 did not sweep the temp file"
    );
    assert!(!misplaced.exists(), "the misplaced file was left in cache/");
    assert!(
        fs::read_dir(backing.join("lost+found"))
            .expect("lost+found")
            .any(|e| fs::read(e.expect("entry").path())
                .is_ok_and(|b| b == b"a copy in the wrong place")),
        "the misplaced file is not in lost+found/"
    );
    assert_eq!(fs::read(mnt.join("f7")).expect("read"), b"file 7\n");
    assert_eq!(
        fs::read(mnt.join("late")).expect("read"),
        b"after the clean mount\n"
    );
    assert_eq!(fs::read_dir(&mnt).expect("list").count(), 101);
    d.unmount();
}

/// An unmount while the model is compressing: the compressions stop within a step
/// (their temp blobs removed), the stop is recorded as clean (so the next mount scans
/// nothing), fsck finds nothing, and the files, still dirty and queued, are compressed
/// after the next mount. (Compressions used to run on past the unmount's 3 s and die
/// with the process: every unmount of a busy volume made the next mount scan every
/// backing file, and fsck in between reported their temp files.)
#[test]
fn an_unmount_during_compression_stops_it_cleanly() {
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=1");
    let text = common::english(10_000);
    let (a, b) = (&text[..5_000], &text[5_000..]);
    fs::write(mnt.join("a.txt"), a).expect("write");
    fs::write(mnt.join("b.txt"), b).expect("write");
    let started = Instant::now();
    while status_field(&mnt, "compressing") == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no compression started:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Into the coding (the model loaded, lanes running).
    while status_field(&mnt, "symbols_coded") == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "nothing coded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        status_field(&mnt, "compressed"),
        0,
        "too late: already done"
    );
    let log_path = d.log.clone();
    d.unmount();
    let log = fs::read_to_string(&log_path).expect("log");
    assert!(log.contains("stopped by the unmount"), "{log}");
    assert!(log.contains("clean stop recorded"), "{log}");
    assert!(!log.contains("not waiting for"), "{log}");
    let temps: Vec<_> = files_under(&backing, "blobs")
        .into_iter()
        .chain(files_under(&backing, "cache"))
        .filter(|p| p.extension().is_some_and(|x| x == "tmp"))
        .collect();
    assert!(temps.is_empty(), "temp files left: {temps:?}");
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 0, "{out}");

    let d = Daemon::start(&backing, &mnt, "idle=3600");
    assert!(
        d.log_text()
            .contains("the last stop was clean: backing files not scanned"),
        "{}",
        d.log_text()
    );
    assert_eq!(status_field(&mnt, "queued"), 2);
    admin("flush", &mnt);
    assert_eq!(status_field(&mnt, "compressed"), 2);
    admin("evict", &mnt);
    assert_eq!(fs::read(mnt.join("a.txt")).expect("read"), a);
    assert_eq!(fs::read(mnt.join("b.txt")).expect("read"), b);
    d.unmount();
}

/// Sets its flag when dropped, a panic's unwinding included.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Evictions (which delete clean copies without the state lock) racing reads that decode
/// and install copies again, truncations of evicted files that make new cache files, and
/// files opened, unlinked and read through their handle: every read sees the content it
/// should, nothing is lost, and the volume checks clean. Binary content, so the classical
/// codec stores it and no model time is spent.
#[test]
fn evictions_racing_reads_truncations_and_unlinks_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let content = |i: u64, round: u64| {
        common::random_bytes(40_000 + 3_000 * i as usize, i * 1000 + round + 1)
    };
    // Files 0-3 never change; 4-5 are truncated and rewritten each round.
    for i in 0..6 {
        fs::write(mnt.join(format!("f{i}")), content(i, 0)).expect("write");
    }
    admin("flush", &mnt);
    assert_eq!(status_field(&mnt, "compressed"), 6);

    let stop = AtomicBool::new(false);
    let end = Instant::now() + Duration::from_secs(20);
    let (evictions, reads, rewrites, orphans) = std::thread::scope(|s| {
        let stop = &stop;
        // However this scope ends (a panic in any thread included), the loops that run
        // until `stop` end too: the scope waits for every thread, so a failed flush in
        // the unlinker left the readers and the evictor running forever, the failure
        // never printed (likely what hung this binary on CI, 2026-12-05).
        let _stop_on_exit = StopOnDrop(stop);
        let mnt = mnt.as_path();
        let evictor = s.spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                admin("evict", mnt);
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        });
        let readers: Vec<_> = (0..2)
            .map(|r| {
                s.spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let i = (n + r) % 4;
                        let got = fs::read(mnt.join(format!("f{i}")))
                            .unwrap_or_else(|e| panic!("read f{i}: {e}"));
                        assert!(
                            got == content(i, 0),
                            "f{i}: wrong content ({} bytes)",
                            got.len()
                        );
                        n += 1;
                        // Moments with no read in progress, when the evictor can take it.
                        std::thread::sleep(Duration::from_millis(3));
                    }
                    n
                })
            })
            .collect();
        let rewriter = s.spawn(move || {
            let mut round = 0u64;
            while Instant::now() < end {
                round += 1;
                for i in 4..6 {
                    let path = mnt.join(format!("f{i}"));
                    // O_TRUNC of a file the evictor may be evicting right now.
                    fs::write(&path, content(i, round))
                        .unwrap_or_else(|e| panic!("rewrite f{i} round {round}: {e}"));
                    let got = fs::read(&path).unwrap_or_else(|e| panic!("read f{i}: {e}"));
                    assert!(
                        got == content(i, round),
                        "f{i} round {round}: wrong content"
                    );
                }
                // Compressed again, so the evictor can take them.
                admin("flush", mnt);
            }
            round
        });
        let unlinker = s.spawn(move || {
            let mut n = 0u64;
            while Instant::now() < end {
                let path = mnt.join(format!("o{n}"));
                let data = content(9, n);
                fs::write(&path, &data).expect("write orphan-to-be");
                admin("flush", mnt);
                admin("evict", mnt);
                // Opened, unlinked, then read through the handle: the decode installs a
                // copy of an inode with no name left.
                let mut f = fs::File::open(&path).expect("open");
                fs::remove_file(&path).expect("unlink");
                let mut got = Vec::new();
                std::io::Read::read_to_end(&mut f, &mut got).expect("read the orphan");
                assert!(got == data, "orphan o{n}: wrong content");
                n += 1;
            }
            n
        });
        let rewrites = rewriter.join().expect("rewriter");
        let orphans = unlinker.join().expect("unlinker");
        stop.store(true, Ordering::Relaxed);
        let reads: u64 = readers.into_iter().map(|r| r.join().expect("reader")).sum();
        (evictor.join().expect("evictor"), reads, rewrites, orphans)
    });
    eprintln!(
        "{evictions} evictions, {reads} reads, {rewrites} rewrite rounds, {orphans} orphans, {} decompressions",
        status_field(&mnt, "decompressions")
    );
    assert!(evictions >= 10 && reads >= 10 && rewrites >= 2 && orphans >= 2);
    assert!(
        status_field(&mnt, "decompressions") >= 10,
        "the reads did not race the evictions: {}",
        xattr(&mnt, "user.nacrith.status")
    );
    let log = d.log.clone();
    d.unmount();
    let log = fs::read_to_string(&log).expect("log");
    assert!(!log.contains("ERROR") && !log.contains("WARN"), "{log}");
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 0, "{out}");
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    for i in 0..6 {
        let got = fs::read(mnt.join(format!("f{i}"))).expect("read after remount");
        let round = if i < 4 { 0 } else { rewrites };
        assert!(got == content(i, round), "f{i} after the remount");
    }
    d.unmount();
}
