//! The nacrithfs index's write pattern, one batch per operation, against three embedded
//! stores: sled 0.34 (nacrithfs's index), redb 2 and fjall 2. Per "file": create (inode,
//! entry, cookie, parent entry, counters, parent inode), rename within the directory,
//! unlink (with a graveyard key), each one atomic batch; a second thread makes everything
//! durable every 500 ms (sled: its own flusher plus `flush`; redb: non-durable commits and
//! an `Immediate` one; fjall: `persist(SyncAll)`). Prints µs per operation by 10,000s,
//! bytes the process wrote to disk per operation, and the store's size at the end.
//!
//! usage: cargo run --release -- [N=100000] [DIR=/var/tmp]
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

trait Store: Send + Sync {
    fn batch(&self, puts: &[(Vec<u8>, Vec<u8>)], dels: &[Vec<u8>]);
    fn get(&self, k: &[u8]) -> Option<Vec<u8>>;
    fn persist(&self);
}

struct Sled(sled::Db);
impl Store for Sled {
    fn batch(&self, puts: &[(Vec<u8>, Vec<u8>)], dels: &[Vec<u8>]) {
        let mut b = sled::Batch::default();
        for (k, v) in puts {
            b.insert(k.as_slice(), v.as_slice());
        }
        for k in dels {
            b.remove(k.as_slice());
        }
        self.0.apply_batch(b).expect("sled batch");
    }
    fn get(&self, k: &[u8]) -> Option<Vec<u8>> {
        self.0.get(k).expect("sled get").map(|v| v.to_vec())
    }
    fn persist(&self) {
        self.0.flush().expect("sled flush");
    }
}

const T: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("index");
struct Redb(redb::Database);
impl Redb {
    fn commit(&self, durability: redb::Durability, f: impl FnOnce(&mut redb::Table<&[u8], &[u8]>)) {
        let mut tx = self.0.begin_write().expect("redb begin");
        tx.set_durability(durability);
        {
            let mut t = tx.open_table(T).expect("redb table");
            f(&mut t);
        }
        tx.commit().expect("redb commit");
    }
}
impl Store for Redb {
    fn batch(&self, puts: &[(Vec<u8>, Vec<u8>)], dels: &[Vec<u8>]) {
        self.commit(redb::Durability::None, |t| {
            for (k, v) in puts {
                t.insert(k.as_slice(), v.as_slice()).expect("redb insert");
            }
            for k in dels {
                t.remove(k.as_slice()).expect("redb remove");
            }
        });
    }
    fn get(&self, k: &[u8]) -> Option<Vec<u8>> {
        let tx = self.0.begin_read().expect("redb read");
        let t = tx.open_table(T).expect("redb table");
        t.get(k).expect("redb get").map(|v| v.value().to_vec())
    }
    fn persist(&self) {
        self.commit(redb::Durability::Immediate, |_| {});
    }
}

struct Fjall(fjall::TxKeyspace, fjall::TxPartitionHandle);
impl Store for Fjall {
    fn batch(&self, puts: &[(Vec<u8>, Vec<u8>)], dels: &[Vec<u8>]) {
        let mut tx = self.0.write_tx();
        for (k, v) in puts {
            tx.insert(&self.1, k.as_slice(), v.as_slice());
        }
        for k in dels {
            tx.remove(&self.1, k.as_slice());
        }
        tx.commit().expect("fjall commit");
    }
    fn get(&self, k: &[u8]) -> Option<Vec<u8>> {
        self.1.get(k).expect("fjall get").map(|v| v.to_vec())
    }
    fn persist(&self) {
        self.0.persist(fjall::PersistMode::SyncAll).expect("fjall persist");
    }
}

fn key(p: u8, a: u64, rest: &[u8]) -> Vec<u8> {
    let mut k = vec![p];
    k.extend_from_slice(&a.to_be_bytes());
    k.extend_from_slice(rest);
    k
}

fn written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes: ").and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(0)
}

fn du(p: &std::path::Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        let m = e.metadata().expect("metadata");
        n += if m.is_dir() { du(&e.path()) } else { m.len() };
    }
    n
}

fn run(name: &str, s: Arc<dyn Store>, dir: &std::path::Path, n: u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let flusher = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                s.persist();
            }
        })
    };
    let inode = vec![7u8; 80];
    let name_of = |i: u64, suffix: &str| format!("file-{i:07}{suffix}").into_bytes();
    let mut line = format!("{name:<14}");
    let mut phase = |label: &str, f: &dyn Fn(u64)| {
        let (mut worst, t0, w0) = (0f64, Instant::now(), written());
        let mut chunk = Instant::now();
        for i in 0..n {
            f(i);
            if (i + 1) % 10_000 == 0 {
                worst = worst.max(chunk.elapsed().as_secs_f64() / 10_000.0 * 1e6);
                chunk = Instant::now();
            }
        }
        let avg = t0.elapsed().as_secs_f64() / n as f64 * 1e6;
        let kb = (written() - w0) as f64 / n as f64 / 1024.0;
        line += &format!(" | {label} {avg:6.1} µs (worst 10k: {worst:6.1}), {kb:5.1} KB");
    };
    phase("create", &|i| {
        let nm = name_of(i, "");
        s.batch(
            &[
                (key(b'i', 1000 + i, &[]), inode.clone()),
                (key(b'd', 2, &nm), vec![1; 17]),
                (key(b'c', 2, &(3 + i).to_be_bytes()), nm.clone()),
                (key(b'p', 1000 + i, &[]), nm.clone()),
                (b"mnext_ino".to_vec(), (1001 + i).to_le_bytes().to_vec()),
                (b"mnext_cookie".to_vec(), (4 + i).to_le_bytes().to_vec()),
                (key(b'i', 2, &[]), inode.clone()),
            ],
            &[],
        );
    });
    phase("rename", &|i| {
        let (old, new) = (name_of(i, ""), name_of(i, ".r"));
        s.get(&key(b'd', 2, &old)).expect("entry");
        s.batch(
            &[
                (key(b'd', 2, &new), vec![1; 17]),
                (key(b'c', 2, &(n + 3 + i).to_be_bytes()), new.clone()),
                (key(b'p', 1000 + i, &[]), new.clone()),
                (b"mnext_cookie".to_vec(), (n + 4 + i).to_le_bytes().to_vec()),
                (key(b'i', 1000 + i, &[]), inode.clone()),
                (key(b'i', 2, &[]), inode.clone()),
            ],
            &[key(b'd', 2, &old), key(b'c', 2, &(3 + i).to_be_bytes())],
        );
    });
    phase("unlink", &|i| {
        let nm = name_of(i, ".r");
        s.get(&key(b'd', 2, &nm)).expect("entry");
        s.batch(
            &[(key(b'g', 1000 + i, &[0; 8]), vec![]), (key(b'i', 2, &[]), inode.clone())],
            &[
                key(b'd', 2, &nm),
                key(b'c', 2, &(n + 3 + i).to_be_bytes()),
                key(b'i', 1000 + i, &[]),
                key(b'p', 1000 + i, &[]),
            ],
        );
    });
    stop.store(true, Ordering::Relaxed);
    flusher.join().expect("flusher");
    s.persist();
    println!("{line} | size at end {:.1} MB", du(dir) as f64 / 1e6);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let base = std::path::PathBuf::from(args.get(2).map(String::as_str).unwrap_or("/var/tmp"));
    println!("# {n} files, one batch per operation, persisted every 500 ms; µs/op, disk KB/op");
    let which = args.get(3).map(String::as_str).unwrap_or("all");
    for engine in ["sled", "redb", "fjall"] {
        if which != "all" && which != engine {
            continue;
        }
        let dir = base.join(format!("index-engines-{engine}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let s: Arc<dyn Store> = match engine {
            "sled" => Arc::new(Sled(sled::Config::new().path(dir.join("db")).open().expect("sled"))),
            "redb" => Arc::new(Redb(redb::Database::create(dir.join("db")).expect("redb"))),
            _ => {
                let ks = fjall::Config::new(dir.join("db")).open_transactional().expect("fjall");
                let p = ks
                    .open_partition("index", fjall::PartitionCreateOptions::default())
                    .expect("partition");
                Arc::new(Fjall(ks, p))
            }
        };
        run(engine, s, &dir, n);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
