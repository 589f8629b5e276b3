//! The filesystem, mounted for real (/dev/fuse, as root) with the real model: the
//! compression lifecycle, remounts, kill -9, the mount helper and POSIX behaviour.

mod common;

use common::mount::*;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn files() -> Vec<(&'static str, Vec<u8>)> {
    let text = common::english(2600);
    vec![
        ("notes/a.txt", text[..1500].to_vec()),
        ("notes/b.txt", text[1500..].to_vec()),
        ("empty", Vec::new()),
        ("random.bin", common::random_bytes(20_000, 7)),
        ("zeros.bin", vec![0u8; 50_000]),
    ]
}

fn check_all(mnt: &Path, expect: &[(&str, Vec<u8>)]) {
    for (name, data) in expect {
        let got = fs::read(mnt.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"));
        assert!(
            got == *data,
            "{name}: content differs ({} vs {} bytes)",
            got.len(),
            data.len()
        );
    }
}

/// With `nopack`: every blob a file of its own (tests/packs.rs covers packed blobs).
#[test]
fn write_flush_compress_evict_remount_read_back() {
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600,nopack");
    fs::create_dir(mnt.join("notes")).expect("mkdir");
    let files = files();
    for (name, data) in &files {
        fs::write(mnt.join(name), data).expect("write");
    }
    for (name, _) in &files {
        assert_eq!(
            xattr(&mnt.join(name), "user.nacrith.state"),
            "dirty",
            "{name}"
        );
    }
    let total: usize = files.iter().map(|(_, d)| d.len()).sum();
    let json = nacrithfs_out(&["status", &mnt.to_string_lossy(), "--json"]);
    assert!(
        json.contains(&format!("\"dirty\": {},", files.len())),
        "{json}"
    );
    assert!(
        json.contains(&format!("\"dirty_bytes\": {total},")),
        "{json}"
    );
    let out = admin("flush", &mnt);
    let flushed = String::from_utf8_lossy(&out.stdout);
    println!("{flushed}");
    assert!(flushed.contains(&format!(
        "flushed: {} files compressed, 0 dirty",
        files.len()
    )));
    check_status_json_and_metrics(&mnt, files.len());
    // Log lines name files by path, found by walking up the up entries.
    let log = d.log_text();
    assert!(log.contains("compressed /notes/a.txt: "), "{log}");
    for (name, data) in &files {
        let p = mnt.join(name);
        assert_eq!(xattr(&p, "user.nacrith.state"), "compressed", "{name}");
        let stored: u64 = xattr(&p, "user.nacrith.stored_size")
            .parse()
            .expect("number");
        println!("{name}: {} -> {stored} bytes", data.len());
        if name.ends_with(".txt") {
            // Small files carry a ~300-byte header; the LLM still beats zstd -19.
            let zstd = zstd::bulk::compress(data, 19).expect("zstd").len() as u64;
            assert!(
                stored < zstd && stored * 2 < data.len() as u64,
                "{name}: {stored} bytes stored for {} of English (zstd -19: {zstd})",
                data.len()
            );
        }
        if *name == "zeros.bin" {
            assert!(stored < 1000, "zeros stored in {stored} bytes");
        }
        // `du` sees what the disk holds: the blob file in whole blocks.
        let blocks = fs::metadata(&p).expect("stat").blocks() * 512;
        let blob_file = files_under(&backing, "blobs")
            .into_iter()
            .find(|b| {
                let ino = fs::metadata(&p).expect("stat").ino();
                b.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{ino}-")))
            })
            .expect("the file's blob");
        let real = fs::metadata(&blob_file).expect("stat blob").blocks() * 512;
        assert_eq!(
            blocks, real,
            "{name}: st_blocks says {blocks} bytes, the blob takes {real}"
        );
    }
    // The status adds the blocks up, with the clean copies and the index.
    let status = xattr(&mnt, "user.nacrith.status");
    let field = |k: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {status}"))
    };
    let blob_blocks: u64 = files_under(&backing, "blobs")
        .iter()
        .map(|b| fs::metadata(b).expect("stat blob").blocks() * 512)
        .sum();
    assert_eq!(field("stored_disk_bytes"), blob_blocks, "{status}");
    assert!(field("stored_bytes") < blob_blocks, "{status}");
    assert!(field("index_bytes") > 0, "{status}");
    assert!(
        field("disk_bytes") >= blob_blocks + field("index_bytes") + total as u64 / 4096 * 4096,
        "clean copies of every file are still there:\n{status}"
    );
    // The blobs were coded by the LLM (the backing directory holds one per file).
    let blobs = files_under(&backing, "blobs").len();
    assert_eq!(blobs, files.len());
    let status = String::from_utf8_lossy(&admin("status", &mnt).stdout).into_owned();
    println!("{status}");
    assert!(
        status.contains("0 queued, 0 due now, 0 compressing"),
        "{status}"
    );
    assert!(
        status.contains(&format!("{} compressed, 0 dirty", files.len())),
        "{status}"
    );

    admin("evict", &mnt);
    let cached = files_under(&backing, "cache").len();
    assert_eq!(cached, 0, "evict left plaintext copies");
    d.unmount();

    let d = Daemon::start(&backing, &mnt, "idle=3600,nopack");
    // Reads decompress (through the model for the text files).
    check_all(&mnt, &files);
    for (name, _) in &files {
        assert_eq!(xattr(&mnt.join(name), "user.nacrith.state"), "compressed");
    }
    // Writing to an evicted compressed file decompresses it first.
    admin("evict", &mnt);
    let a = mnt.join("notes/a.txt");
    let mut f = OpenOptions::new()
        .append(true)
        .open(&a)
        .expect("open for append");
    f.write_all(b"\nappended line\n").expect("append");
    drop(f);
    let mut expect = files[0].1.clone();
    expect.extend_from_slice(b"\nappended line\n");
    assert_eq!(fs::read(&a).expect("read"), expect);
    assert_eq!(xattr(&a, "user.nacrith.state"), "dirty");
    // O_TRUNC needs no decompression and loses nothing else.
    fs::write(mnt.join("notes/b.txt"), b"short").expect("truncate-write");
    assert_eq!(fs::read(mnt.join("notes/b.txt")).expect("read"), b"short");
    d.unmount();
}

/// `nacrithfs ARGS`, which must succeed: its stdout.
fn nacrithfs_out(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run nacrithfs");
    assert!(
        out.status.success(),
        "nacrithfs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `status --json` is JSON (python's parser agrees) with the status's numbers;
/// `metrics` is Prometheus text with a type per metric; `--textfile` writes the same,
/// readable by a collector running as another user.
fn check_status_json_and_metrics(mnt: &Path, files: usize) {
    let m = mnt.to_string_lossy();
    let json = nacrithfs_out(&["status", &m, "--json"]);
    let mut py = Command::new("python3")
        .args(["-c", "import json,sys; d=json.load(sys.stdin); print(d['compressed'], d['dirty'], d['queued'])"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (installed by scripts/setup)");
    py.stdin
        .take()
        .expect("stdin")
        .write_all(json.as_bytes())
        .expect("feed python");
    let parsed = py.wait_with_output().expect("python3");
    assert!(parsed.status.success(), "not JSON:\n{json}");
    assert_eq!(
        String::from_utf8_lossy(&parsed.stdout),
        format!("{files} 0 0\n")
    );
    let metrics = nacrithfs_out(&["metrics", &m]);
    let label = format!("{{mountpoint=\"{m}\"}}");
    assert!(
        metrics.contains(&format!("nacrithfs_compressed{label} {files}\n")),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE nacrithfs_bytes_in_total counter\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE nacrithfs_dirty gauge\n"),
        "{metrics}"
    );
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').expect("name value");
        assert!(
            name.starts_with("nacrithfs_") && name.ends_with(&label),
            "{line}"
        );
        value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let prom = dir.path().join("nacrithfs.prom");
    nacrithfs_out(&["metrics", &m, "--textfile", &prom.to_string_lossy()]);
    let written = fs::read_to_string(&prom).expect("textfile");
    assert_eq!(written.lines().count(), metrics.lines().count());
    assert!(written.contains(&format!("nacrithfs_compressed{label} {files}\n")));
    assert_eq!(fs::metadata(&prom).expect("stat").mode() & 0o777, 0o644);
}

#[test]
fn kill9_with_queued_and_compressing_files_loses_nothing() {
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());

    // Round 1: files written and fsynced, queued (idle not over yet), then kill -9.
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let mut expect: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..6 {
        let name = format!("f{i}.bin");
        let data = common::random_bytes(10_000 + i * 999, i as u64 + 1);
        write_synced(&mnt.join(&name), &data);
        expect.push((name, data));
    }
    let text = common::english(1200);
    write_synced(&mnt.join("t.txt"), &text);
    expect.push(("t.txt".into(), text));
    for (name, _) in &expect {
        assert_eq!(xattr(&mnt.join(name), "user.nacrith.state"), "dirty");
    }
    d.kill9();

    // Round 2: everything is there and still pending; kill -9 again while the text file
    // is being compressed.
    let d = Daemon::start(&backing, &mnt, "idle=0");
    let start = Instant::now();
    loop {
        let s = xattr(&mnt.join("t.txt"), "user.nacrith.state");
        if s == "compressing" {
            break;
        }
        assert!(
            s != "compressed",
            "t.txt compressed before the kill could land"
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "t.txt never compressing"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for (name, data) in &expect {
        assert_eq!(&fs::read(mnt.join(name)).expect("read"), data, "{name}");
    }
    d.kill9();

    // Round 3: intact, and it all compresses.
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    for (name, data) in &expect {
        assert_eq!(&fs::read(mnt.join(name)).expect("read"), data, "{name}");
    }
    admin("flush", &mnt);
    admin("evict", &mnt);
    for (name, data) in &expect {
        assert_eq!(
            xattr(&mnt.join(name), "user.nacrith.state"),
            "compressed",
            "{name}"
        );
        assert_eq!(&fs::read(mnt.join(name)).expect("read"), data, "{name}");
    }
    println!("verified {} files after two kill -9 rounds", expect.len());
    d.unmount();
}

fn daemon_pid_for(mnt: &Path) -> Option<i32> {
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.first().is_some_and(|a| a.ends_with(b"nacrithfs"))
            && args.iter().any(|a| *a == mnt.as_os_str().as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

#[test]
fn mount_helper_tag_source_and_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    fs::create_dir(&mnt).expect("mnt");
    // mount(8) runs mount.fuse3, which runs `nacrithfs` from PATH (it daemonizes once
    // live). mount(8) resets PATH to the system's, where only the installed copy is, so
    // call mount.fuse3 as mount(8) would, with this build first in PATH.
    let bin_dir = Path::new(BIN).parent().expect("bin dir");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("mount.fuse3")
        .arg("coldtag")
        .arg(&mnt)
        .args(["-t", "fuse.nacrithfs"])
        .arg("-o")
        .arg(format!("backing={},idle=60,workers=1", backing.display()))
        .env("PATH", &path)
        .output()
        .expect("mount(8)");
    assert!(
        out.status.success(),
        "mount.fuse3 -t fuse.nacrithfs failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        fs::read_to_string(backing.join("nacrithfs.log")).unwrap_or_default()
    );
    let mounts = fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    let line = mounts
        .lines()
        .find(|l| l.contains(&format!(" {} ", mnt.display())))
        .expect("mount listed");
    assert!(line.starts_with("coldtag "), "{line}");
    assert!(line.contains(" fuse.nacrithfs "), "{line}");
    fs::write(mnt.join("x"), b"hello").expect("write");
    assert!(backing.join("nacrithfs.format").exists());

    let pid = daemon_pid_for(&mnt).expect("daemon process");
    // SAFETY: signalling the daemon we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let start = Instant::now();
    while is_mounted(&mnt) || Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "SIGTERM did not unmount"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = fs::read_to_string(backing.join("nacrithfs.log")).expect("log");
    assert!(log.contains("unmounted"), "{log}");

    // A second mount of the same backing directory finds the file.
    let d = Daemon::start(&backing, &mnt, "idle=60");
    assert_eq!(fs::read(mnt.join("x")).expect("read"), b"hello");
    d.unmount();

    // Bad input: an unknown option and a non-empty foreign directory are refused clearly.
    let out = Command::new(BIN)
        .arg(&backing)
        .arg(&mnt)
        .args(["-o", "bogus=1"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown option"));
    let foreign = dir.path().join("foreign");
    fs::create_dir(&foreign).expect("foreign");
    fs::write(foreign.join("data"), b"x").expect("write");
    let out = Command::new(BIN)
        .arg(&foreign)
        .arg(&mnt)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a nacrithfs backing directory"), "{err}");
    assert!(!is_mounted(&mnt));
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let f = CString::new(from.as_os_str().as_bytes()).expect("path");
    let t = CString::new(to.as_os_str().as_bytes()).expect("path");
    // SAFETY: valid strings; AT_FDCWD with absolute paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn posix_behaviour() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let p = |n: &str| mnt.join(n);

    // O_APPEND, overwrite, truncate up (sparse) and down.
    fs::write(p("f"), b"hello").expect("write");
    let mut f = OpenOptions::new().append(true).open(p("f")).expect("open");
    f.write_all(b" world").expect("append");
    drop(f);
    assert_eq!(fs::read(p("f")).expect("read"), b"hello world");
    let f = OpenOptions::new().write(true).open(p("f")).expect("open");
    f.set_len(100_000).expect("extend");
    f.set_len(5).expect("shrink");
    drop(f);
    assert_eq!(fs::read(p("f")).expect("read"), b"hello");

    // SEEK_DATA / SEEK_HOLE report the plaintext's holes (the backing is ext4 here).
    {
        use std::os::fd::AsRawFd;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(p("sparse"))
            .expect("create");
        f.set_len(1 << 20).expect("extend");
        std::os::unix::fs::FileExt::write_all_at(&f, b"data", 1 << 19).expect("write");
        let seek = |off: i64, whence: i32| {
            // SAFETY: a valid fd.
            let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
            (r >= 0)
                .then_some(r)
                .ok_or_else(std::io::Error::last_os_error)
        };
        assert_eq!(seek(0, libc::SEEK_DATA).expect("SEEK_DATA"), 1 << 19);
        assert_eq!(seek(0, libc::SEEK_HOLE).expect("SEEK_HOLE"), 0);
        let hole = seek(1 << 19, libc::SEEK_HOLE).expect("SEEK_HOLE");
        assert!(hole > 1 << 19 && hole <= 1 << 20, "{hole}");
        let e = seek(1 << 20, libc::SEEK_DATA).expect_err("past the end");
        assert_eq!(e.raw_os_error(), Some(libc::ENXIO));
        drop(f);
        fs::remove_file(p("sparse")).expect("rm");
    }

    // rename: plain, NOREPLACE, EXCHANGE, over an existing file.
    fs::write(p("g"), b"gee").expect("write");
    let e = renameat2(&p("f"), &p("g"), libc::RENAME_NOREPLACE).expect_err("noreplace");
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
    renameat2(&p("f"), &p("g"), libc::RENAME_EXCHANGE).expect("exchange");
    assert_eq!(fs::read(p("f")).expect("read"), b"gee");
    assert_eq!(fs::read(p("g")).expect("read"), b"hello");
    fs::rename(p("f"), p("g")).expect("rename over");
    assert!(!p("f").exists());
    assert_eq!(fs::read(p("g")).expect("read"), b"gee");

    // Directories, hard links, symlinks, nlink counts.
    fs::create_dir_all(p("d/e")).expect("mkdirs");
    assert_eq!(fs::metadata(p("d")).expect("stat").nlink(), 3);
    fs::hard_link(p("g"), p("d/link")).expect("link");
    assert_eq!(fs::metadata(p("g")).expect("stat").nlink(), 2);
    std::os::unix::fs::symlink("../g", p("d/sym")).expect("symlink");
    assert_eq!(
        fs::read_link(p("d/sym")).expect("readlink"),
        Path::new("../g")
    );
    assert_eq!(fs::read(p("d/sym")).expect("through symlink"), b"gee");
    let e = fs::remove_dir(p("d")).expect_err("rmdir non-empty");
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY));
    let mut names: Vec<String> = fs::read_dir(p("d"))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["e", "link", "sym"]);

    // Unlinked while open: still readable through the handle, gone afterwards.
    fs::write(p("tmp"), b"still here").expect("write");
    let mut h = File::open(p("tmp")).expect("open");
    fs::remove_file(p("tmp")).expect("unlink");
    let mut s = String::new();
    h.read_to_string(&mut s).expect("read unlinked");
    assert_eq!(s, "still here");
    drop(h);

    // chmod, xattrs, fifo, statfs.
    fs::set_permissions(p("g"), fs::Permissions::from_mode(0o600)).expect("chmod");
    assert_eq!(fs::metadata(p("g")).expect("stat").mode() & 0o7777, 0o600);
    let out = Command::new("setfattr")
        .args(["-n", "user.color", "-v", "blue"])
        .arg(p("g"))
        .output()
        .expect("setfattr");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(xattr(&p("g"), "user.color"), "blue");
    let c = CString::new(p("fifo").as_os_str().as_bytes()).expect("path");
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    assert!(fs::metadata(p("fifo")).expect("stat").file_type().is_fifo());
    let out = Command::new("df").arg(&mnt).output().expect("df");
    assert!(out.status.success());

    // Exclusive create and mmap-style writes through a second handle.
    let e = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(p("g"))
        .expect_err("O_EXCL");
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
    // An ioctl the daemon does not know (isatty's TCGETS, asked by every Python open):
    // ENOTTY as on ext4, and no log line per call.
    {
        use std::os::fd::AsRawFd;
        let f = File::open(p("g")).expect("open");
        // SAFETY: a valid fd.
        assert_eq!(unsafe { libc::isatty(f.as_raw_fd()) }, 0);
        let err = std::io::Error::last_os_error();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY), "{err}");
    }
    let log = d.log_text();
    assert!(!log.contains("Not Implemented"), "{log}");
    d.unmount();

    // Everything above survives a remount.
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    assert_eq!(fs::read(p("g")).expect("read"), b"gee");
    assert_eq!(xattr(&p("g"), "user.color"), "blue");
    assert_eq!(fs::read(p("d/link")).expect("read"), b"gee");
    assert!(!p("tmp").exists());
    d.unmount();
}

/// `len` bytes of `f` through a read-only mapping of kind `flags`.
fn mapped(f: &File, len: usize, flags: i32) -> Vec<u8> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a read-only mapping of an open file, copied out and unmapped before return.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            flags,
            f.as_raw_fd(),
            0,
        );
        assert!(
            p != libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let v = std::slice::from_raw_parts(p as *const u8, len).to_vec();
        libc::munmap(p, len);
        v
    }
}

/// A read of a compressed file decodes only the chunks under it (plus a few read ahead)
/// and is answered before the rest of the file is decoded. With `stream_reads` a large
/// read is answered with the part decoded so far, and an mmap of that same handle still
/// sees every byte. Reading everything installs the verified plaintext as the clean copy.
#[test]
fn a_read_decodes_only_the_chunks_it_covers() {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600,chunk_size=1024");
    let text = common::english(16_000);
    let path = mnt.join("book.txt");
    fs::write(&path, &text).expect("write");
    let notes = mnt.join("notes.txt");
    fs::write(&notes, &text[..200]).expect("write");
    admin("flush", &mnt);
    admin("evict", &mnt);
    assert_eq!(xattr(&path, "user.nacrith.state"), "compressed");
    assert_eq!(
        status_field(&mnt, "cache_bytes"),
        0,
        "the file was not evicted"
    );

    let regions = status_field(&mnt, "regions_decoded");

    // 100 bytes from the middle of the file's third chunk: a read-only handle of a
    // compressed file does direct I/O, so the daemon is asked for these bytes only.
    let f = File::open(&path).expect("open");
    let mut buf = [0u8; 100];
    f.read_exact_at(&mut buf, 2500).expect("read");
    assert_eq!(&buf[..], &text[2500..2600], "partial read differs");
    let decoded = status_field(&mnt, "regions_decoded") - regions;
    println!("a 100-byte read: {decoded} of ~16 chunks decoded when it returned");
    assert!(decoded >= 1, "a read returned with nothing decoded");
    assert!(
        decoded < 12,
        "{decoded} chunks decoded for 100 bytes: not a partial read"
    );
    assert_eq!(
        status_field(&mnt, "decompressions"),
        0,
        "the whole file was decoded for 100 bytes"
    );
    drop(f);
    d.unmount();

    // Again with stream_reads (the partial decode went with the unmount): a `cat`-sized
    // read from the start is answered once the first chunk is in, with what is decoded
    // from there on, not held until all 64 KiB are.
    let d = Daemon::start(&backing, &mnt, "idle=3600,chunk_size=1024,stream_reads");
    let f = File::open(&path).expect("open");
    let mut big = vec![0u8; 64 << 10];
    let n = (&f).read(&mut big).expect("read from the start");
    println!("a 64 KiB read at 0 returned {n} bytes");
    assert!(
        n > 0 && n < text.len(),
        "a read of a file being decoded returned {n} of {} bytes",
        text.len()
    );
    assert!(big[..n] == text[..n], "streamed read differs");

    // An mmap of that same handle reads through the page cache, whose reads must be
    // answered whole (a short one would end the file there): every byte, both kinds.
    for (kind, flags) in [("private", libc::MAP_PRIVATE), ("shared", libc::MAP_SHARED)] {
        assert!(
            mapped(&f, text.len(), flags) == text,
            "MAP_{kind} mapping of a streaming handle differs"
        );
    }
    drop(f);

    // The whole file: every chunk, verified, installed as the clean copy.
    assert!(
        fs::read(&path).expect("read all") == text,
        "full read differs"
    );
    // The last read is answered as its chunks arrive; the whole-file check and the
    // install follow.
    let t = Instant::now();
    while status_field(&mnt, "decompressions") == 0 && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status_field(&mnt, "decompressions"), 1);
    assert_eq!(status_field(&mnt, "cache_bytes"), text.len() as u64);
    assert_eq!(status_field(&mnt, "decompress_failures"), 0);

    // Rewriting a compressed file through O_TRUNC (`>`, cp) empties it without decoding
    // it first (its one chunk would take about a second).
    let regions = status_field(&mnt, "regions_decoded");
    fs::write(&notes, b"rewritten\n").expect("rewrite");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        status_field(&mnt, "regions_decoded"),
        regions,
        "open(O_TRUNC) decoded the file it was emptying"
    );
    assert_eq!(fs::read(&notes).expect("read"), b"rewritten\n");
    d.unmount();
}

/// copy_file_range(2) answers as the kernel's generic path does on ext4: EBADF for a
/// read-only or O_APPEND destination and for a write-only source, EINVAL for an
/// overlapping range in one file, EISDIR for a directory, EFBIG past the largest
/// offset; a copy from past the end copies nothing; a plain copy copies.
#[test]
fn copy_file_range_errors_are_the_kernel_s() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let (src, dst) = (mnt.join("src"), mnt.join("dst"));
    fs::write(&src, vec![b'x'; 100_000]).expect("write");
    fs::write(&dst, b"y").expect("write");
    let open = |p: &Path, flags: i32| {
        OpenOptions::new()
            .read(flags & libc::O_ACCMODE != libc::O_WRONLY)
            .write(flags & libc::O_ACCMODE != libc::O_RDONLY)
            .custom_flags(flags & !libc::O_ACCMODE)
            .open(p)
            .expect("open")
    };
    let copy = |from: &File, from_off: i64, to: &File, to_off: i64, len: usize| {
        let (mut a, mut b) = (from_off, to_off);
        // SAFETY: valid descriptors and offset pointers; no buffers are passed.
        let r = unsafe {
            libc::copy_file_range(from.as_raw_fd(), &mut a, to.as_raw_fd(), &mut b, len, 0)
        };
        if r < 0 {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        } else {
            Ok(r)
        }
    };
    let s = open(&src, libc::O_RDONLY);
    assert_eq!(
        copy(&s, 0, &open(&dst, libc::O_RDONLY), 0, 100),
        Err(libc::EBADF)
    );
    let append = open(&dst, libc::O_WRONLY | libc::O_APPEND);
    assert_eq!(copy(&s, 0, &append, 0, 100), Err(libc::EBADF));
    let rw = open(&src, libc::O_RDWR);
    assert_eq!(copy(&rw, 1000, &rw, 0, 5000), Err(libc::EINVAL));
    let wo = open(&src, libc::O_WRONLY);
    assert_eq!(
        copy(&wo, 0, &open(&dst, libc::O_WRONLY), 0, 100),
        Err(libc::EBADF)
    );
    let d_fd = File::open(&mnt).expect("open dir");
    assert_eq!(
        copy(&d_fd, 0, &open(&dst, libc::O_WRONLY), 0, 100),
        Err(libc::EISDIR)
    );
    let w = open(&dst, libc::O_WRONLY);
    assert_eq!(copy(&s, 0, &w, i64::MAX - 10, 100), Err(libc::EFBIG));
    assert_eq!(copy(&s, 200_000, &w, 0, 100), Ok(0));
    assert_eq!(copy(&s, 0, &w, 0, 100), Ok(100));
    drop(w);
    assert_eq!(fs::read(&dst).expect("read"), vec![b'x'; 100]);
    drop((s, append, rw, wo, d_fd));
    d.unmount();
}

/// A directory removed while a process holds it open (rmdir, or a rename over it) stays
/// usable through that handle: fstat succeeds with nlink 0, nothing can be created in
/// it, and its inode goes when the handle is closed (fsck clean after the unmount).
#[test]
fn a_directory_removed_while_open_lives_on_through_its_handle() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    fs::create_dir(mnt.join("gone")).expect("mkdir");
    let held = File::open(mnt.join("gone")).expect("open the directory");
    fs::remove_dir(mnt.join("gone")).expect("rmdir while open");
    let m = held.metadata().expect("fstat of a removed directory");
    assert!(m.is_dir());
    assert_eq!(m.nlink(), 0, "a removed directory has no links");
    let name = CString::new("x").expect("name");
    // SAFETY: a valid directory fd and NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            held.as_raw_fd(),
            name.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY,
            0o644,
        )
    };
    let err = std::io::Error::last_os_error();
    assert_eq!(fd, -1, "a file was created in a removed directory");
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    assert_eq!(fs::read_dir(&mnt).expect("list").count(), 0);

    // rename(2) over an empty directory that is held open.
    fs::create_dir(mnt.join("a")).expect("mkdir a");
    fs::write(mnt.join("a/kept"), b"moved along\n").expect("write");
    fs::create_dir(mnt.join("b")).expect("mkdir b");
    let held_b = File::open(mnt.join("b")).expect("open b");
    let ino_b = held_b.metadata().expect("fstat b").ino();
    fs::rename(mnt.join("a"), mnt.join("b")).expect("rename over an open empty directory");
    let m = held_b.metadata().expect("fstat of the replaced directory");
    assert_eq!((m.ino(), m.nlink()), (ino_b, 0));
    assert_eq!(
        fs::read(mnt.join("b/kept")).expect("read"),
        b"moved along\n"
    );
    drop(held);
    drop(held_b);
    d.unmount();
    let (code, text) = fsck(&[], &backing);
    assert_eq!(code, 0, "fsck after removed open directories:\n{text}");
    // Their inodes went with the last handle: only the root, b and b/kept remain.
    assert!(text.contains(" 3 inodes"), "{text}");
}

/// O_TMPFILE is not supported (fuser 0.18 speaks FUSE 7.40 and has no TMPFILE opcode;
/// the kernel turns its ENOSYS into EOPNOTSUPP): the call fails cleanly, as SEMANTICS.md
/// says, nothing is left behind, and the mount goes on serving. Programs that fall back
/// to a named temporary file on EOPNOTSUPP (glibc's tmpfile, coreutils) work.
#[test]
fn o_tmpfile_fails_cleanly_with_eopnotsupp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    let path = CString::new(mnt.as_os_str().as_bytes()).expect("path");
    for _ in 0..2 {
        // SAFETY: a NUL-terminated path.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_TMPFILE | libc::O_RDWR, 0o600) };
        let err = std::io::Error::last_os_error();
        assert_eq!(
            fd, -1,
            "O_TMPFILE gave a descriptor: update SEMANTICS.md and test linkat"
        );
        assert_eq!(err.raw_os_error(), Some(libc::EOPNOTSUPP), "{err}");
    }
    fs::write(mnt.join("after"), b"still serving\n").expect("write after O_TMPFILE");
    assert_eq!(
        fs::read(mnt.join("after")).expect("read"),
        b"still serving\n"
    );
    assert_eq!(fs::read_dir(&mnt).expect("list").count(), 1);
    d.unmount();
    let (code, text) = fsck(&[], &backing);
    assert_eq!(code, 0, "{text}");
}

fn set_times(path: &Path, atime: i64, mtime: i64) {
    let p = CString::new(path.as_os_str().as_bytes()).expect("path");
    let ts = [
        libc::timespec {
            tv_sec: atime,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: mtime,
            tv_nsec: 0,
        },
    ];
    // SAFETY: a valid path and two timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ts.as_ptr(), 0) };
    assert_eq!(r, 0, "utimensat: {}", std::io::Error::last_os_error());
}

/// atime, which the kernel leaves to a FUSE daemon, follows the mount: `relatime` (the
/// default) updates it on the first read or listing after a change and not again within
/// a day, `strictatime` on every one, `noatime` never; and it survives a remount.
#[test]
fn atime_follows_relatime_strictatime_and_noatime() {
    // Attributes are cached by the kernel for a second: wait that long before a stat.
    let settle = || std::thread::sleep(Duration::from_millis(1100));
    const OLD: i64 = 1_600_000_000;
    for (opts, first, again) in [
        ("idle=3600", true, false),
        ("idle=3600,strictatime", true, true),
        ("idle=3600,noatime", false, false),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (backing, mnt) = new_volume(dir.path());
        let d = Daemon::start(&backing, &mnt, opts);
        let f = mnt.join("f.txt");
        write_synced(&f, b"read me\n");
        fs::create_dir(mnt.join("sub")).expect("mkdir");
        // Accessed before the last change: relatime updates on the next read.
        set_times(&f, OLD, OLD + 10);
        set_times(&mnt.join("sub"), OLD, OLD + 10);
        settle();
        assert_eq!(fs::read(&f).expect("read"), b"read me\n");
        fs::read_dir(mnt.join("sub")).expect("list").for_each(drop);
        settle();
        let a1 = fs::metadata(&f).expect("stat").atime();
        let d1 = fs::metadata(mnt.join("sub")).expect("stat").atime();
        assert_eq!(a1 > OLD, first, "{opts}: first read, atime {a1}");
        assert_eq!(d1 > OLD, first, "{opts}: first listing, atime {d1}");
        settle();
        fs::read(&f).expect("read again");
        settle();
        let a2 = fs::metadata(&f).expect("stat").atime();
        assert_eq!(a2 > a1, again, "{opts}: second read, atime {a1} -> {a2}");
        d.unmount();
        let d = Daemon::start(&backing, &mnt, opts);
        assert_eq!(
            fs::metadata(&f).expect("stat after remount").atime(),
            a2,
            "{opts}: atime after a remount"
        );
        d.unmount();
    }
}

/// `mount -o remount,HOW` as mount(8) does it: mount.fuse3 runs `nacrithfs SOURCE
/// MOUNTPOINT -o remount,..` from PATH (this build first; mount(8) itself would find the
/// installed copy).
fn remount_via_helper(backing: &Path, mnt: &Path, how: &str) -> std::process::Output {
    let bin_dir = Path::new(BIN).parent().expect("bin dir");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("mount.fuse3")
        .arg(backing)
        .arg(mnt)
        .args(["-t", "fuse.nacrithfs", "-o", &format!("remount,{how}")])
        .env("PATH", &path)
        .output()
        .expect("mount.fuse3")
}

/// The options /proc/mounts shows for the mount at `m`.
fn mount_opts(m: &Path) -> String {
    let mounts = fs::read_to_string("/proc/mounts").expect("mounts");
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(m.to_str().expect("utf-8")))
        .unwrap_or_else(|| panic!("{} not mounted", m.display()))
        .to_string();
    line.split(' ').nth(3).expect("options").to_string()
}

/// A daemon started with `-o ro` serves a private copy of the index and changes no file
/// of the volume: `remount,rw` is refused (what it accepted would be lost at unmount)
/// and the mount stays read-only; `evict` is refused; and a decode that takes the clean
/// copies over this mount's `cache_size` evicts none of them (it used to delete the
/// volume's clean copies, which the volume's own index still called cached).
#[test]
fn a_volume_mounted_read_only_stays_untouched() {
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let a = common::english(2000);
    let b = common::english(2500);
    let d = Daemon::start(&backing, &mnt, "idle=3600,cache_size=64M");
    write_synced(&mnt.join("a.txt"), &a);
    write_synced(&mnt.join("b.txt"), &b);
    admin("flush", &mnt);
    admin("evict", &mnt);
    // a.txt decoded again: a clean copy in the volume's cache/, b.txt's blob alone.
    assert_eq!(fs::read(mnt.join("a.txt")).expect("read a"), a);
    let ino_a = fs::metadata(mnt.join("a.txt")).expect("stat").ino();
    d.unmount();
    let copy_a = cache_file(&backing, ino_a);
    assert!(
        copy_a.exists(),
        "no clean copy of a.txt at {}",
        copy_a.display()
    );

    let d = Daemon::start(&backing, &mnt, "ro,cache_size=1");
    // A decode on this mount: the clean copies are over its cap of 1 byte.
    assert_eq!(fs::read(mnt.join("b.txt")).expect("read b"), b);
    assert!(
        copy_a.exists(),
        "a read-only mount deleted the volume's clean copy"
    );
    let out = remount_via_helper(&backing, &mnt, "rw");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "remount,rw of an -o ro mount succeeded"
    );
    assert!(err.contains("stays read-only"), "{err}");
    assert!(mount_opts(&mnt).starts_with("ro,"), "{}", mount_opts(&mnt));
    let e = fs::create_dir(mnt.join("d")).expect_err("mkdir on a read-only mount");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    assert_eq!(fs::read(mnt.join("a.txt")).expect("read"), a);
    d.unmount();

    let d = Daemon::start(&backing, &mnt, "idle=3600");
    assert_eq!(fs::read(mnt.join("a.txt")).expect("read a after"), a);
    assert_eq!(fs::read(mnt.join("b.txt")).expect("read b after"), b);
    assert!(!mnt.join("d").exists());
    d.unmount();
    let (code, text) = fsck(&[], &backing);
    assert_eq!(code, 0, "{text}");
}

/// A read-only mount cannot install what it decodes in the backing directory, so it
/// keeps each whole decode as a temp file in its private directory: those are held to
/// `cache_size` like clean copies (least recently used first), and a file whose decode
/// went is decoded again when read. (Before, a long-lived read-only mount kept every file
/// it ever decoded until unmount.)
#[test]
fn a_read_only_mount_keeps_its_decodes_under_the_cache_cap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let tmp = dir.path().join("tmp");
    fs::create_dir(&tmp).expect("mkdir tmp");
    const SIZE: usize = 64 << 10;
    let files: Vec<(String, Vec<u8>)> = (0..6u64)
        .map(|i| (format!("f{i}.bin"), common::random_bytes(SIZE, 201 + 2 * i)))
        .collect();
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    for (name, data) in &files {
        write_synced(&mnt.join(name), data);
    }
    admin("flush", &mnt);
    admin("evict", &mnt);
    d.unmount();

    let cap = 150 << 10; // two whole decodes fit, a third does not
    let tmp_env = tmp.to_string_lossy().into_owned();
    let d = Daemon::start_env(
        &backing,
        &mnt,
        &format!("ro,cache_size={cap}"),
        &[("TMPDIR", tmp_env.as_str())],
    );
    let decoded_bytes = || -> u64 {
        let mut total = 0;
        for dir in fs::read_dir(&tmp).expect("ls tmp").flatten() {
            for f in fs::read_dir(dir.path()).into_iter().flatten().flatten() {
                if f.file_name().to_string_lossy().ends_with(".tmp") {
                    total += f.metadata().map_or(0, |m| m.len());
                }
            }
        }
        total
    };
    for round in 0..2 {
        // (The kernel's page cache would answer the second round itself.)
        fs::write("/proc/sys/vm/drop_caches", b"3\n").expect("drop_caches");
        for (name, data) in &files {
            assert_eq!(
                &fs::read(mnt.join(name)).expect("read"),
                data,
                "{name}, round {round}"
            );
        }
    }
    // The cap is enforced right after each decode's readers are answered.
    let start = Instant::now();
    while decoded_bytes() > cap && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let kept = decoded_bytes();
    assert!(
        kept <= cap,
        "{kept} bytes of decodes kept, over the cap of {cap}"
    );
    assert!(
        kept > 0,
        "no decode kept at all (the directory looked at: {})",
        tmp.display()
    );
    // Every read of the second round found its decode gone (the six do not fit) and
    // decoded it again.
    let decoded = status_field(&mnt, "decompressions");
    assert!(
        decoded >= 12,
        "{decoded} decompressions for 12 reads of evicted files"
    );
    assert_eq!(status_field(&mnt, "decompress_failures"), 0);
    d.unmount();
    assert_eq!(decoded_bytes(), 0, "decodes left behind after unmount");
    let (code, text) = fsck(&[], &backing);
    assert_eq!(code, 0, "{text}");
}

/// A write to a compressed file waits for the whole file to be decoded; its chunks go
/// to the pool a few at a time (as many as the pool has lanes), so a cold read of
/// another file is served after the chunks already running, not after the whole file.
/// (They were all queued at once: every chunk's coded bytes in memory, and the other
/// reader behind all of them.) One worker of 1 + 4 lanes, 1 KiB chunks.
#[test]
fn a_cold_read_is_not_queued_behind_a_whole_file_decode() {
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(
        &backing,
        &mnt,
        "idle=3600,workers=1,batch=1,chunk_size=1K,head_chunk=0,verify=none",
    );
    let big = common::english(24_000); // at least 24 chunks of at most 1 KiB
    let small = common::english(500);
    write_synced(&mnt.join("big.txt"), &big);
    write_synced(&mnt.join("small.txt"), &small);
    admin("flush", &mnt);
    admin("evict", &mnt);
    assert_eq!(status_field(&mnt, "regions_decoded"), 0);
    let path = mnt.join("big.txt");
    let writer = std::thread::spawn(move || {
        let mut f = OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open big.txt");
        f.write_all(b"x").expect("append to big.txt");
    });
    // The append's decode is under way (its first chunks in the lanes: a 1 KiB chunk
    // takes seconds here)...
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !writer.is_finished(),
        "the whole file decoded before the test could look"
    );
    // ...when another file is read cold.
    assert_eq!(fs::read(mnt.join("small.txt")).expect("read small"), small);
    let decoded = status_field(&mnt, "regions_decoded");
    assert!(
        decoded <= 10,
        "the cold read waited for {decoded} regions of the other file's decode"
    );
    writer.join().expect("writer");
    let mut expect = big.clone();
    expect.push(b'x');
    assert_eq!(fs::read(mnt.join("big.txt")).expect("read big"), expect);
    assert!(status_field(&mnt, "regions_decoded") >= 25);
    d.unmount();
}

/// `mount -o remount,ro` and `remount,rw` (mount(8) runs this binary as its helper):
/// the mount turns read-only with its files readable and its queue kept (nothing is
/// compressed while read-only), then writable again, and the queue is compressed.
#[test]
fn remount_read_only_and_back_keeps_files_and_queue() {
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=1");
    let text = common::english(3000);
    write_synced(&mnt.join("a.txt"), &text);
    let remount = |how: &str| remount_via_helper(&backing, &mnt, how);
    let out = remount("ro");
    assert!(
        out.status.success(),
        "remount,ro: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let o = mount_opts(&mnt);
    assert!(o.starts_with("ro,") && o.contains("nosuid"), "{o}");
    let err = fs::write(mnt.join("b.txt"), b"x").expect_err("a write on a read-only mount");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert_eq!(fs::read(mnt.join("a.txt")).expect("read"), text);
    assert_eq!(status_field(&mnt, "paused"), 1);
    // Due after 1 s, but nothing is compressed while read-only.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(xattr(&mnt.join("a.txt"), "user.nacrith.state"), "queued");
    assert_eq!(status_field(&mnt, "compressed_since_mount"), 0);

    let out = remount("rw");
    assert!(
        out.status.success(),
        "remount,rw: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(mount_opts(&mnt).starts_with("rw,"));
    assert_eq!(status_field(&mnt, "paused"), 0);
    fs::write(mnt.join("b.txt"), b"written after remount,rw\n").expect("write");
    admin("flush", &mnt);
    assert_eq!(
        xattr(&mnt.join("a.txt"), "user.nacrith.state"),
        "compressed"
    );
    assert_eq!(fs::read(mnt.join("a.txt")).expect("read"), text);
    // Not a nacrithfs mount: refused with the reason.
    let out = Command::new(BIN)
        .arg("x")
        .arg(dir.path())
        .args(["-o", "remount,ro"])
        .output()
        .expect("nacrithfs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a nacrithfs mount"));
    d.unmount();
}

/// A file handle (name_to_handle_at) as knfsd keeps it.
fn file_handle(path: &Path) -> Vec<u64> {
    let mut buf = vec![0u64; 32];
    let fh = buf.as_mut_ptr().cast::<libc::file_handle>();
    let p = CString::new(path.as_os_str().as_bytes()).expect("path");
    let mut mount_id = 0;
    // SAFETY: buf holds a file_handle with 128 bytes of room after its header.
    let r = unsafe {
        (*fh).handle_bytes = 128;
        libc::name_to_handle_at(libc::AT_FDCWD, p.as_ptr(), fh, &mut mount_id, 0)
    };
    assert_eq!(
        r,
        0,
        "name_to_handle_at {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    buf
}

fn open_by_handle(mnt: &Path, handle: &mut [u64]) -> std::io::Result<File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mount_fd = File::open(mnt)?;
    // SAFETY: a valid mount fd and a handle name_to_handle_at filled.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            handle.as_mut_ptr().cast(),
            libc::O_RDONLY,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn drop_kernel_caches() {
    fs::write("/proc/sys/vm/drop_caches", b"2\n").expect("drop_caches");
}

/// File handles (name_to_handle_at / open_by_handle_at, what knfsd uses to export a
/// filesystem) of files and directories open the same objects after the kernel forgot
/// them and after a remount; a deleted file's handle is stale.
#[test]
fn file_handles_work_across_cache_drops_and_remounts() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    fs::create_dir_all(mnt.join("a/b")).expect("mkdir");
    fs::write(mnt.join("a/b/f.txt"), b"exported\n").expect("write");
    fs::write(mnt.join("gone.txt"), b"soon deleted\n").expect("write");
    let mut file = file_handle(&mnt.join("a/b/f.txt"));
    let mut subdir = file_handle(&mnt.join("a/b"));
    let mut gone = file_handle(&mnt.join("gone.txt"));
    fs::remove_file(mnt.join("gone.txt")).expect("unlink");
    let check = |file: &mut [u64], subdir: &mut [u64], when: &str| {
        drop_kernel_caches();
        let mut f = open_by_handle(&mnt, file).unwrap_or_else(|e| panic!("{when}: file: {e}"));
        let mut s = String::new();
        f.read_to_string(&mut s).expect("read by handle");
        assert_eq!(s, "exported\n", "{when}");
        drop_kernel_caches();
        let d = open_by_handle(&mnt, subdir).unwrap_or_else(|e| panic!("{when}: dir: {e}"));
        assert!(d.metadata().expect("fstat").is_dir(), "{when}");
        // The directory's path was reconnected through ".." lookups: it lists.
        let name = CString::new("f.txt").expect("name");
        // SAFETY: a valid directory fd and name.
        let fd = unsafe { libc::openat(d.as_raw_fd(), name.as_ptr(), libc::O_RDONLY) };
        assert!(fd >= 0, "{when}: openat in a handle-opened directory");
        // SAFETY: our fd.
        unsafe { libc::close(fd) };
    };
    check(&mut file, &mut subdir, "same mount");
    let err = open_by_handle(&mnt, &mut gone).expect_err("a deleted file's handle");
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    d.unmount();
    let d = Daemon::start(&backing, &mnt, "idle=3600");
    check(&mut file, &mut subdir, "after a remount");
    d.unmount();
}

/// Names in `blobs/` grouped by the backing inode they name: (link count, names).
fn blob_inodes(backing: &Path) -> Vec<(u64, Vec<std::path::PathBuf>)> {
    let mut by_ino: std::collections::BTreeMap<u64, (u64, Vec<std::path::PathBuf>)> =
        Default::default();
    for p in files_under(backing, "blobs") {
        let m = fs::metadata(&p).expect("stat blob");
        by_ino
            .entry(m.ino())
            .or_insert((m.nlink(), Vec::new()))
            .1
            .push(p);
    }
    by_ino.into_values().collect()
}

/// Equal files share one blob (deduplication; with `nopack`, so every blob is a file of
/// its own — tests/packs.rs shares packed blobs): the first is coded, a later copy
/// becomes a second name of its blob (a hard link in the backing directory) without a
/// symbol of model time; every copy reads back, also after the first is deleted; a
/// rewritten copy gets a blob of its own; fsck counts the sharing and finds no problem.
#[test]
fn equal_files_share_one_blob_and_cost_no_model_time() {
    let _llm = common::llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = new_volume(dir.path());
    let d = Daemon::start(&backing, &mnt, "idle=3600,nopack");
    // Long enough for the LLM coder (not zstd): a copy coded again would show in
    // symbols_coded.
    let text = common::english(2000);
    fs::write(mnt.join("a.txt"), &text).expect("write");
    admin("flush", &mnt);
    let coded = status_field(&mnt, "symbols_coded");
    assert!(coded > 100, "the model coded only {coded} symbols");
    fs::create_dir(mnt.join("sub")).expect("mkdir");
    fs::write(mnt.join("b.txt"), &text).expect("write");
    fs::write(mnt.join("sub/c.txt"), &text).expect("write");
    admin("flush", &mnt);
    assert_eq!(
        status_field(&mnt, "symbols_coded"),
        coded,
        "an equal file was coded again"
    );
    assert_eq!(status_field(&mnt, "shared_files"), 2);
    for name in ["a.txt", "b.txt", "sub/c.txt"] {
        assert_eq!(
            xattr(&mnt.join(name), "user.nacrith.state"),
            "compressed",
            "{name}"
        );
    }
    let groups = blob_inodes(&backing);
    assert_eq!(
        groups.len(),
        1,
        "one blob for three equal files: {groups:?}"
    );
    assert_eq!(groups[0].0, 3, "its link count");
    assert_eq!(groups[0].1.len(), 3, "its names");

    // A file that differs by one byte is coded.
    let mut other = text.clone();
    other.push(b'\n');
    fs::write(mnt.join("d.txt"), &other).expect("write");
    admin("flush", &mnt);
    assert!(
        status_field(&mnt, "symbols_coded") > coded,
        "d.txt was not coded"
    );
    assert_eq!(blob_inodes(&backing).len(), 2);

    // Every copy decodes from the shared blob; deleting the first leaves the others.
    admin("evict", &mnt);
    for name in ["a.txt", "b.txt", "sub/c.txt"] {
        assert!(fs::read(mnt.join(name)).expect("read") == text, "{name}");
    }
    fs::remove_file(mnt.join("a.txt")).expect("unlink");
    std::thread::sleep(Duration::from_secs(3));
    admin("evict", &mnt);
    for name in ["b.txt", "sub/c.txt"] {
        assert!(fs::read(mnt.join(name)).expect("read") == text, "{name}");
    }
    let shared: Vec<_> = blob_inodes(&backing)
        .into_iter()
        .filter(|(_, names)| names.len() > 1)
        .collect();
    assert_eq!(shared.len(), 1, "{shared:?}");
    assert_eq!(shared[0].0, 2, "the link count after the first name went");

    // A new copy still finds a blob to share: the hint names b.txt's or c.txt's (whichever
    // committed last), both alive. Then a rewritten copy gets its own blob and the others
    // keep reading. (Rewritten first, b.txt could take the blob the hint names with it:
    // e.txt would then be coded, as SEMANTICS.md says.)
    fs::write(mnt.join("e.txt"), &text).expect("write");
    let before = status_field(&mnt, "shared_files");
    admin("flush", &mnt);
    assert_eq!(status_field(&mnt, "shared_files"), before + 1, "e.txt");
    fs::write(mnt.join("b.txt"), b"rewritten\n").expect("write");
    admin("flush", &mnt);
    admin("evict", &mnt);
    assert_eq!(fs::read(mnt.join("b.txt")).expect("read"), b"rewritten\n");
    for name in ["sub/c.txt", "e.txt"] {
        assert!(fs::read(mnt.join(name)).expect("read") == text, "{name}");
    }
    d.unmount();
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("2 files share their blob with an equal file"),
        "{out}"
    );

    // The hint names e.txt's blob (the newest with that content): once e.txt is gone
    // the hint is stale, which is no problem; a repair drops it.
    let d = Daemon::start(&backing, &mnt, "idle=3600,nopack");
    fs::remove_file(mnt.join("e.txt")).expect("unlink");
    d.unmount();
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("1 content hints name blobs that are gone"),
        "{out}"
    );
    let (code, out) = fsck(&["--repair"], &backing);
    assert_eq!(code, 0, "{out}");
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("content hints"), "{out}");
    let d = Daemon::start(&backing, &mnt, "idle=3600,nopack");
    assert!(fs::read(mnt.join("sub/c.txt")).expect("read") == text);

    // Equal files queued together are claimed by several compressors at once: one codes
    // the content, the others wait for it and share its blob.
    let mut fresh = b"Another text, queued three times at once.\n".to_vec();
    fresh.extend_from_slice(&common::english(2000));
    for name in ["x1.txt", "x2.txt", "x3.txt"] {
        fs::write(mnt.join(name), &fresh).expect("write");
    }
    let (coded0, shared0) = (
        status_field(&mnt, "symbols_coded"),
        status_field(&mnt, "shared_files"),
    );
    admin("flush", &mnt);
    let spent = status_field(&mnt, "symbols_coded") - coded0;
    assert!(
        spent < coded * 3 / 2,
        "three equal files cost {spent} symbols, one costs about {coded}"
    );
    assert_eq!(status_field(&mnt, "shared_files"), shared0 + 2);
    admin("evict", &mnt);
    for name in ["x1.txt", "x2.txt", "x3.txt"] {
        assert!(fs::read(mnt.join(name)).expect("read") == fresh, "{name}");
    }
    d.unmount();
    let (code, out) = fsck(&[], &backing);
    assert_eq!(code, 0, "{out}");
}
