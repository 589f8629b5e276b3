//! `nacrithfs`: the daemon (and `mount -t fuse.nacrithfs` helper) plus admin commands.
//!
//! ```text
//! nacrithfs BACKING MOUNTPOINT [-o opts] [-f]      mount (daemonizes once live)
//! nacrithfs TAG MOUNTPOINT -o backing=DIR,...      the same, fstab style
//! nacrithfs flush|evict|compact|status|metrics MOUNTPOINT
//! nacrithfs fsck BACKING [--repair] [--deep] [--model PATH]
//! nacrithfs recode BACKING --to cpu|cuda [--force-backend] [--dry-run] [--model PATH]
//! ```

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nacrithfs::admin;
use nacrithfs::fs::fuse::NacrithFs;
use nacrithfs::fs::options::EXIT_INDEX_HUNG;
use nacrithfs::fs::{background, Core, FsOptions};
use nacrithfs::model::find_model;
use nacrithfs::pool::LazyPool;
use nacrithfs::store::Store;

const USAGE: &str = "\
usage:
  nacrithfs BACKING MOUNTPOINT [-o OPTIONS] [-f]   mount BACKING at MOUNTPOINT
  nacrithfs TAG MOUNTPOINT -o backing=DIR[,...]    the same, with the source as a tag
  nacrithfs flush MOUNTPOINT     compress every closed file now; wait until done
  nacrithfs evict MOUNTPOINT     drop clean plaintext copies from the cache
  nacrithfs compact MOUNTPOINT   give back the space of deleted files' packed blobs now
  nacrithfs status MOUNTPOINT [--json] [--backends]
                                 queue, sizes, ratio, worker throughput; --backends
                                 adds blobs per backend (reads every blob header)
  nacrithfs metrics MOUNTPOINT [--textfile PATH [--interval SECONDS]]
                                 the status as Prometheus text (for node_exporter's
                                 textfile collector: written atomically to PATH, once
                                 or every SECONDS)
  nacrithfs fsck BACKING [--repair] [--deep] [--model PATH]
                                 check an unmounted backing directory (writing nothing
                                 in it); --repair fixes
                                 what can be fixed without losing data, --deep decodes
                                 LLM blobs too (loads the model). Exit 0 clean, 1 all
                                 repaired, 4 problems remain, 8 fsck itself failed.
  nacrithfs recode BACKING --to cpu|cuda [--force-backend] [--dry-run]
                   [--nopack] [--model PATH] [--workers N] [--jobs N]
                                 re-encode (offline) every blob coded on another
                                 backend on this one, verified and crash-safe; a rerun
                                 resumes. --dry-run counts blobs per backend and says
                                 what would be done; --jobs: files at once
                                 (default: every lane of the pool, at most 64);
                                 --nopack: new blobs as files, not packed.
                                 Exit 0 all done, 4 files left (their backend is
                                 not here; --force-backend tries).

mount options (-o a,b=c): idle=SECONDS (30), cache_size=BYTES (1G),
  workers=N (cores; with GPUs: per GPU, 1), batch=LANES (16), chunk_size=BYTES (16K),
  head_chunk=BYTES (4K), compress_max=BYTES (16G), model=PATH, verify=full|none (full),
  allow_other, allow_root, default_permissions (always on), ro, noatime, nosuid, ...
-f stays in the foreground (for systemd); logs go to stderr there, else to
BACKING/nacrithfs.log.";

fn main() {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let first = args.first().map(|a| a.to_string_lossy().into_owned());
    let result = match first.as_deref() {
        None | Some("-h") | Some("--help") | Some("help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some("-V") | Some("--version") => {
            println!("nacrithfs {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Some(cmd @ ("flush" | "evict" | "compact" | "status" | "metrics")) => {
            admin_main(cmd, &args[1..])
        }
        Some("fsck") => {
            set_private_umask();
            // Exit codes as e2fsck's: a failure is 8 and a usage error 16, never 1
            // ("problems found, all repaired").
            if let Err((code, e)) = fsck_main(&args[1..]) {
                eprintln!("nacrithfs: fsck: {e}");
                std::process::exit(code);
            }
            Ok(())
        }
        Some("recode") => {
            set_private_umask();
            init_logging();
            recode_main(&args[1..])
        }
        Some(_) => {
            set_private_umask();
            mount_main(&args)
        }
    };
    if let Err(e) = result {
        eprintln!("nacrithfs: error: {e}");
        std::process::exit(1);
    }
}

/// Whatever the daemon and fsck create in the backing directory (plaintext, blobs, the
/// index, the log, lost+found/) is the owner's only.
fn set_private_umask() {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(nacrithfs::store::perms::UMASK as libc::mode_t) };
}

/// Exit code of fsck for a usage error (e2fsck's).
const FSCK_USAGE: i32 = 16;
/// Exit code of fsck that could not check (e2fsck's "operational error").
const FSCK_FAILED: i32 = 8;

fn fsck_main(args: &[OsString]) -> Result<(), (i32, String)> {
    let usage = || {
        (
            FSCK_USAGE,
            "usage: nacrithfs fsck BACKING [--repair] [--deep] [--model PATH]".to_string(),
        )
    };
    let (mut backing, mut repair, mut deep, mut model) = (None, false, false, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--repair") => repair = true,
            Some("--deep") => deep = true,
            Some("--model") => {
                model = Some(PathBuf::from(it.next().ok_or_else(usage)?));
                deep = true;
            }
            Some(s) if s.starts_with('-') => {
                let (code, u) = usage();
                return Err((code, format!("unknown flag {s}\n{u}")));
            }
            _ if backing.is_none() => backing = Some(PathBuf::from(a)),
            _ => return Err(usage()),
        }
    }
    let backing = backing.ok_or_else(usage)?;
    let pool = if deep {
        let failed = |e: String| (FSCK_FAILED, e);
        let path = find_model(model.as_deref()).map_err(|e| failed(e.to_string()))?;
        Some(
            nacrithfs::pool::load(&path, None, nacrithfs::pool::DEFAULT_LANES)
                .map_err(|e| failed(e.to_string()))?,
        )
    } else {
        None
    };
    let opts = nacrithfs::store::fsck::FsckOptions {
        repair,
        engine: pool.as_ref().map(|p| p as &dyn nacrithfs::codec::Engine),
    };
    let report = match nacrithfs::store::fsck::fsck(&backing, opts) {
        Ok(r) => r,
        Err(e) => return Err((FSCK_FAILED, e.to_string())),
    };
    for f in &report.findings {
        match &f.repaired {
            Some(done) => println!("{:<18} {} -> {done}", f.code, f.detail),
            None if f.fixable => println!("{:<18} {} (--repair fixes this)", f.code, f.detail),
            None => println!("{:<18} {} (cannot be repaired)", f.code, f.detail),
        }
    }
    println!(
        "{}: {} inodes, {} files, {} blobs checked ({} decoded{}); {} problems, {} repaired",
        backing.display(),
        report.inodes,
        report.files,
        report.blobs_checked,
        report.blobs_decoded,
        if deep {
            ""
        } else {
            ", LLM blobs: header only; --deep decodes them"
        },
        report.findings.len(),
        report.findings.len() - report.unresolved(),
    );
    if report.shared_blobs > 0 {
        println!(
            "{} files share their blob with an equal file (deduplicated; not a problem)",
            report.shared_blobs
        );
    }
    if report.stale_hints > 0 {
        println!(
            "{} content hints name blobs that are gone (harmless{})",
            report.stale_hints,
            if repair {
                "; dropped"
            } else {
                "; --repair drops them"
            }
        );
    }
    if report.awaiting_deletion > 0 {
        println!(
            "{} deleted or superseded files {} (left by a crash; not a problem)",
            report.awaiting_deletion,
            if repair {
                "were removed"
            } else {
                "await removal by the next mount or --repair"
            }
        );
    }
    std::process::exit(report.exit_code());
}

/// `recode BACKING --to cpu|cuda ...`: see [`nacrithfs::recode`].
fn recode_main(args: &[OsString]) -> Result<(), String> {
    use nacrithfs::recode::{self, Target};
    let usage = "usage: nacrithfs recode BACKING --to cpu|cuda [--force-backend] [--dry-run] [--nopack] [--model PATH] [--workers N] [--jobs N]";
    let (mut backing, mut target, mut model, mut workers, mut jobs) =
        (None, None, None, None, None);
    let (mut force_backend, mut dry_run, mut nopack) = (false, false, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().and_then(|v| v.to_str()).ok_or(usage);
        match a.to_str() {
            Some("--to") => target = Some(value()?.parse::<Target>()?),
            Some("--model") => model = Some(PathBuf::from(value()?)),
            Some("--workers") => {
                workers = Some(value()?.parse::<usize>().map_err(|_| usage)?.max(1))
            }
            Some("--jobs") => jobs = Some(value()?.parse::<usize>().map_err(|_| usage)?.max(1)),
            Some("--force-backend") => force_backend = true,
            Some("--dry-run") => dry_run = true,
            Some("--nopack") => nopack = true,
            Some(s) if s.starts_with('-') => return Err(format!("unknown flag {s}\n{usage}")),
            _ if backing.is_none() => backing = Some(PathBuf::from(a)),
            _ => return Err(usage.into()),
        }
    }
    let (backing, target) = (backing.ok_or(usage)?, target.ok_or(usage)?);
    let model = find_model(model.as_deref()).map_err(|e| e.to_string())?;
    // Each token is decoded (unless a clean copy serves), coded and verified: ~3 counts
    // per ~3.6 bytes of English.
    let render = admin::Progress::new("recode", 1.2);
    let opts = recode::Options {
        target,
        model,
        force_backend,
        dry_run,
        nopack,
        workers,
        jobs,
        lanes: nacrithfs::pool::DEFAULT_LANES,
        progress: &|p| {
            render.show(
                p.bytes_done,
                p.bytes_total,
                p.files_done,
                p.files_total,
                p.symbols,
            )
        },
    };
    let report = recode::recode(&backing, &opts).map_err(|e| format!("recode: {e}"))?;
    render.finish();
    println!("target backend: {}", report.target_tag);
    let table = |title: &str, counts: &std::collections::BTreeMap<String, recode::BackendCount>| {
        println!("{title}:");
        if counts.is_empty() {
            println!("  (no compressed files)");
        }
        for (tag, c) in counts {
            println!(
                "  {:>7} blobs {:>7} files {:>12} bytes  {tag}",
                c.blobs, c.files, c.bytes
            );
        }
    };
    table("blobs per backend, before", &report.before);
    if dry_run {
        println!(
            "dry run: {} files would be recoded, {} left as they are; nothing changed",
            report.recoded,
            report.files_left()
        );
    } else if report.recoded + report.linked == 0 && report.left.is_empty() {
        println!("nothing to do: every blob decodes on {}", report.target_tag);
    } else {
        table("blobs per backend, after", &report.after);
        println!(
            "recoded {} files ({} from their clean copy, {} stored with zstd after a failed verify), \
             {} linked to an equal file's new blob; their blobs {} -> {} bytes",
            report.recoded,
            report.from_clean_copy,
            report.zstd_fallback,
            report.linked,
            report.bytes_before,
            report.bytes_after
        );
    }
    for (why, n) in &report.left {
        println!("left as they are: {n} files: {why}");
    }
    if !report.left.is_empty() {
        std::process::exit(4);
    }
    Ok(())
}

// ---- admin commands: talk to the daemon through xattrs on the mount's root ----

/// `flush|evict|status|metrics MOUNTPOINT [options]`.
fn admin_main(cmd: &str, args: &[OsString]) -> Result<(), String> {
    let usage = || match cmd {
        "status" => "usage: nacrithfs status MOUNTPOINT [--json] [--backends]".to_string(),
        "metrics" => {
            "usage: nacrithfs metrics MOUNTPOINT [--textfile PATH [--interval SECONDS]]".into()
        }
        _ => format!("usage: nacrithfs {cmd} MOUNTPOINT"),
    };
    let mut mnt = None;
    let (mut json, mut textfile, mut interval, mut backends) = (false, None, None, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--json") if cmd == "status" => json = true,
            Some("--backends") if cmd == "status" => backends = true,
            Some("--textfile") if cmd == "metrics" => {
                textfile = Some(PathBuf::from(it.next().ok_or_else(usage)?))
            }
            Some("--interval") if cmd == "metrics" => {
                let v = it.next().and_then(|v| v.to_str()).ok_or_else(usage)?;
                interval = Some(v.parse::<u64>().map_err(|_| usage())?);
            }
            Some(s) if s.starts_with('-') => return Err(usage()),
            _ if mnt.is_none() => mnt = Some(PathBuf::from(a)),
            _ => return Err(usage()),
        }
    }
    let mnt = mnt.ok_or_else(usage)?;
    if interval.is_some() && textfile.is_none() {
        return Err(usage());
    }
    match cmd {
        "status" => admin::print_status(&mnt, json, backends),
        "metrics" => admin::metrics(&mnt, textfile.as_deref(), interval),
        "evict" => admin::evict(&mnt),
        "compact" => admin::compact(&mnt),
        _ => admin::flush(&mnt),
    }
}

// ---- mounting ----

struct MountArgs {
    source: PathBuf,
    mountpoint: PathBuf,
    foreground: bool,
    opts: FsOptions,
}

fn parse_mount_args(args: &[OsString]) -> Result<MountArgs, String> {
    let mut positional = Vec::new();
    let mut opts = FsOptions::default();
    let mut foreground = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        match s.as_ref() {
            "-f" | "--foreground" => foreground = true,
            "-o" => {
                let v = it.next().ok_or("-o needs options")?;
                opts.apply(&v.to_string_lossy())?;
            }
            // mount(8) passes these; nothing to do.
            "-n" | "-s" | "-v" => {}
            s if s.starts_with("-o") => opts.apply(&s[2..])?,
            s if s.starts_with('-') => return Err(format!("unknown flag {s}\n{USAGE}")),
            _ => positional.push(PathBuf::from(a)),
        }
    }
    let [source, mountpoint] = <[PathBuf; 2]>::try_from(positional)
        .map_err(|_| format!("need a source and a mount point\n{USAGE}"))?;
    Ok(MountArgs {
        source,
        mountpoint,
        foreground,
        opts,
    })
}

fn mount_main(args: &[OsString]) -> Result<(), String> {
    let m = parse_mount_args(args)?;
    if m.opts.remount {
        let mountpoint = std::fs::canonicalize(&m.mountpoint)
            .map_err(|e| format!("mount point {}: {e}", m.mountpoint.display()))?;
        return nacrithfs::fs::mount::remount(&mountpoint, &m.opts);
    }
    let backing = m.opts.backing.clone().unwrap_or_else(|| m.source.clone());
    let backing = std::fs::canonicalize(&backing)
        .map_err(|e| format!("backing directory {}: {e}", backing.display()))?;
    let mountpoint = std::fs::canonicalize(&m.mountpoint)
        .map_err(|e| format!("mount point {}: {e}", m.mountpoint.display()))?;
    if !mountpoint.is_dir() {
        return Err(format!(
            "mount point {} is not a directory",
            mountpoint.display()
        ));
    }
    if m.foreground {
        init_logging();
        return serve(&m, &backing, &mountpoint, &mut None);
    }
    // Fork before any thread exists; the parent returns once the mount is live (or
    // reports why it is not), the child carries on as the daemon.
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid two-int array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and are owned here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other threads exist yet, so fork is safe.
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork: {}", std::io::Error::last_os_error())),
        0 => {
            drop(rd);
            // SAFETY: plain syscalls in the child.
            unsafe { libc::setsid() };
            let log = backing.join(nacrithfs::store::LOG_FILE);
            redirect_stdio(&log);
            init_logging();
            let mut report = Some(std::fs::File::from(wr));
            if let Err(e) = serve(&m, &backing, &mountpoint, &mut report) {
                log::error!("{e}");
                if let Some(mut r) = report {
                    let _ = r.write_all(e.as_bytes());
                }
                std::process::exit(1);
            }
            std::process::exit(0);
        }
        _child => {
            drop(wr);
            let mut msg = String::new();
            let _ = std::fs::File::from(rd).read_to_string(&mut msg);
            match msg.strip_prefix("OK") {
                Some(_) => Ok(()),
                None if msg.is_empty() => Err(format!(
                    "the daemon exited during startup; see {}",
                    backing.join(nacrithfs::store::LOG_FILE).display()
                )),
                None => Err(msg),
            }
        }
    }
}

fn redirect_stdio(log: &Path) {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null");
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .and_then(|f| {
            // A log made by an older version may be 0644: it names every path.
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            Ok(f)
        });
    // SAFETY: dup2 onto the standard descriptors of this (single-threaded) child.
    unsafe {
        if let Ok(n) = &null {
            libc::dup2(n.as_raw_fd(), 0);
            libc::dup2(n.as_raw_fd(), 1);
        }
        match (&logf, &null) {
            (Ok(l), _) => libc::dup2(l.as_raw_fd(), 2),
            (_, Ok(n)) => libc::dup2(n.as_raw_fd(), 2),
            _ => 0,
        };
    }
}

fn init_logging() {
    let env = env_logger::Env::default().default_filter_or("nacrithfs=info,warn");
    env_logger::Builder::from_env(env)
        .format_timestamp_secs()
        .init();
}

/// Open the store, load the model, mount, report readiness, serve until unmounted.
/// Every file with an open handle that has been read or written holds one descriptor
/// of its cache file, so users of the mount, together, decide how many the daemon
/// needs: the soft limit (often 1024) goes up to the hard one.
fn raise_fd_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill in and then pass back.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 || r.rlim_cur >= r.rlim_max {
            return;
        }
        let was = r.rlim_cur;
        r.rlim_cur = r.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &r) == 0 {
            log::debug!("open files: limit raised from {was} to {}", r.rlim_max);
        } else {
            log::warn!(
                "open files: cannot raise the limit of {was}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn serve(
    m: &MountArgs,
    backing: &Path,
    mountpoint: &Path,
    report: &mut Option<std::fs::File>,
) -> Result<(), String> {
    // Signals go to one thread that unmounts; block them before any thread starts.
    let sigs = signal_set();
    // SAFETY: a valid, initialized signal set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &sigs, std::ptr::null_mut()) };

    raise_fd_limit();
    match nacrithfs::store::perms::secure_backing(backing, m.opts.read_only)? {
        Some(done) if m.opts.read_only => log::warn!("{done}"),
        Some(done) => log::info!("{done}"),
        None => {}
    }
    nacrithfs::store::index::set_cache_bytes(m.opts.index_cache);
    log::debug!(
        "index block cache: {} MiB",
        nacrithfs::store::index::cache_bytes() >> 20
    );
    let store = if m.opts.read_only {
        Store::open_read_only(backing)
    } else {
        Store::open(backing)
    }
    .map_err(|e| e.to_string())?;
    // The model is loaded on first use; a file that is missing or not a usable GGUF now
    // is a mistake worth refusing the mount for (later it only delays compression).
    let model_path = find_model(m.opts.model.as_deref()).map_err(|e| e.to_string())?;
    nacrithfs::model::gguf::Metadata::read(&model_path)
        .map_err(|e| format!("model {}: {e}", model_path.display()))?;
    log::info!("model {} (loaded on first use)", model_path.display());
    let pool = Arc::new(LazyPool::new(model_path, m.opts.workers, m.opts.batch));
    let (core, rx) = Core::new(store, pool, m.opts.clone()).map_err(|e| e.to_string())?;
    let workers = background::start(core.clone(), rx).map_err(|e| e.to_string())?;
    {
        // A weak reference: the core (and with it a read-only mount's private
        // directory) goes away at unmount as before.
        let core = Arc::downgrade(&core);
        let limit = m.opts.index_timeout;
        std::thread::Builder::new()
            .name("nacrith-watchdog".into())
            .spawn(move || watchdog(&core, limit))
            .map_err(|e| e.to_string())?;
    }

    let fsname = m.source.to_string_lossy().into_owned();
    let session = nacrithfs::fs::mount::mount(
        NacrithFs { core: core.clone() },
        &fsname,
        mountpoint,
        &m.opts,
    )
    .map_err(|e| format!("mounting at {}: {e}", mountpoint.display()))?;
    log::info!(
        "mounted {} at {} (idle {} s, {} workers x {} lanes, verify {})",
        backing.display(),
        mountpoint.display(),
        m.opts.idle.as_secs(),
        nacrithfs::pool::total_workers(m.opts.workers),
        m.opts.batch,
        if m.opts.verify { "full" } else { "none" }
    );
    if let Some(mut r) = report.take() {
        // Closing the pipe lets the parent exit.
        let _ = r.write_all(b"OK");
    }
    sd_notify("READY=1");

    let mp = mountpoint.to_path_buf();
    std::thread::Builder::new()
        .name("nacrith-signals".into())
        .spawn(move || wait_for_signal_and_unmount(sigs, &mp))
        .map_err(|e| e.to_string())?;

    let result = session.run();
    sd_notify("STOPPING=1");
    let committed = core.shutdown();
    if !committed && !m.opts.read_only {
        log::warn!("the stop is not recorded as clean: the next mount scans the backing files");
    }
    if committed && workers.finish(std::time::Duration::from_secs(3)) && !m.opts.read_only {
        // Nothing runs any more and everything is committed: the next mount may skip
        // its scan of the backing files.
        match core.store.mark_clean_stop() {
            Ok(()) => {
                log::info!("clean stop recorded");
                // The index closed (every other holder of the core is gone), then
                // rebuilt if its journal outweighs its tables: a volume left unmounted
                // keeps no journal of this session (docs/DURABILITY.md, "Index rebuild").
                match Arc::try_unwrap(core) {
                    Ok(core) => {
                        drop(core);
                        if let Err(e) = nacrithfs::store::rebuild_index_after_stop(backing) {
                            log::warn!("index: not rebuilt after the stop: {e}");
                        }
                    }
                    Err(_) => log::info!("index: not rebuilt after the stop (still in use)"),
                }
            }
            Err(e) => log::warn!("recording the clean stop: {e} (the next mount scans)"),
        }
    }
    log::info!("unmounted {}", mountpoint.display());
    result.map_err(|e| format!("FUSE session: {e}"))
}

/// Every second: if an index call has been in flight for `limit`, the index is hung
/// (see `store::watchdog`): log it and exit non-zero, for systemd to restart a daemon
/// whose recovery starts from the last durable commit. Otherwise tell systemd's own
/// watchdog (`WatchdogSec=` in the unit) that this process is alive.
fn watchdog(core: &std::sync::Weak<Core>, limit: std::time::Duration) {
    let ping = std::env::var_os("WATCHDOG_USEC").is_some();
    let mut stuck_since: Option<std::time::Instant> = None;
    let mut warned = std::time::Duration::ZERO;
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let Some(core) = core.upgrade() else {
            return;
        };
        let (oldest, failed) = (core.store.watch().oldest(), core.store.watch().failed());
        // A daemon whose requests cannot get the state lock answers nothing, though no
        // index call may be in flight: no ping then, and systemd's own watchdog
        // (`WatchdogSec=`) kills and restarts it.
        let answers = !ping || core.answers(std::time::Duration::from_secs(1));
        drop(core);
        if answers {
            stuck_since = None;
            warned = std::time::Duration::ZERO;
        } else {
            let since = *stuck_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= warned {
                log::error!(
                    "the daemon has not answered for {} s (its state lock is held): no watchdog ping to systemd, which restarts it after WatchdogSec",
                    since.elapsed().as_secs()
                );
                warned = since.elapsed() + std::time::Duration::from_secs(30);
            }
        }
        if failed {
            log::error!(
                "fatal: the index failed a write to disk and refuses every write since; exiting with status {EXIT_INDEX_HUNG} so that systemd restarts the daemon (the volume recovers from its last durable state)"
            );
            log::logger().flush();
            std::process::exit(EXIT_INDEX_HUNG);
        }
        match oldest {
            Some((op, age)) if !limit.is_zero() && age >= limit => {
                log::error!(
                    "fatal: an index call ({op}) has not returned for {} s: the index is hung; exiting with status {EXIT_INDEX_HUNG} so that systemd restarts the daemon (the volume recovers from its last durable state)",
                    age.as_secs()
                );
                log::logger().flush();
                std::process::exit(EXIT_INDEX_HUNG);
            }
            _ if ping && answers => sd_notify("WATCHDOG=1"),
            _ => {}
        }
    }
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initializes the set; the signal numbers are valid.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        libc::sigaddset(&mut s, libc::SIGTERM);
        libc::sigaddset(&mut s, libc::SIGINT);
        libc::sigaddset(&mut s, libc::SIGHUP);
        s
    }
}

fn wait_for_signal_and_unmount(sigs: libc::sigset_t, mountpoint: &Path) {
    let mut sig = 0;
    // SAFETY: sigs is initialized and blocked in every thread.
    unsafe { libc::sigwait(&sigs, &mut sig) };
    log::info!("signal {sig}: unmounting {}", mountpoint.display());
    nacrithfs::fs::mount::unmount(mountpoint);
}

fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_bytes();
    let r = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), Path::new(&path))
    };
    if let Err(e) = r {
        log::warn!("sd_notify: {e}");
    }
}
