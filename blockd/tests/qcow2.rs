//! qcow2 against the reference implementation: images made and written by QEMU's own `qemu-img`
//! and `qemu-io` (Debian package qemu-utils) are read through `bulkhead_blockd`'s qcow2 format
//! and compared byte for byte with `qemu-img convert -O raw`; images written through ours are
//! verified by `qemu-img check` (no errors, no leaks), `qemu-img compare` and `qemu-io read -P`.
//! Cluster sizes 512 B to 2 MiB, versions 2 and 3, refcount widths 1, 16 and 64 bits, raw and
//! qcow2 backing files (relative names), both cache modes, and hostile images that must give an
//! error, never a panic.
//!
//! These tests need qemu-img and qemu-io: without them they fail (they do not skip).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bulkhead_blockd::format::{open_image, AlignedBuf, Cache, DiskImage, Format};
use bulkhead_blockd::iov::GuestIov;
use bulkhead_blockd::qcow2::{read_header, Qcow2};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Permissions};

/// A scratch directory under the target dir (O_DIRECT-capable, unlike a tmpfs /tmp), removed
/// when the test passes.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "qcow2-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Dir(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs a qemu-utils tool; panics (loudly) if it is missing or fails.
fn tool(prog: &str, args: &[&str], cwd: &Path) -> String {
    let out = Command::new(prog)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| {
            panic!("{prog} could not be run ({e}): install qemu-utils (apt-get install qemu-utils)")
        });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn qemu_img(d: &Dir, args: &[&str]) -> String {
    tool("qemu-img", args, &d.0)
}

/// `qemu-io -f FMT -c CMD... IMAGE`; fails on any command that reports a failure.
fn qemu_io(d: &Dir, fmt: &str, image: &str, cmds: &[String]) -> String {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(image);
    let out = tool("qemu-io", &args, &d.0);
    for bad in ["fail", "Pattern verification failed", "error"] {
        assert!(!out.contains(bad), "qemu-io {cmds:?} on {image}: {out}");
    }
    out
}

/// `qemu-img check`: no errors, no leaks, no corruptions.
fn check_clean(d: &Dir, image: &str) {
    let out = qemu_img(d, &["check", "--output=json", image]);
    for key in [
        "check-errors",
        "leaks",
        "corruptions",
        "corruptions-fixed",
        "leaks-fixed",
    ] {
        let v = out
            .lines()
            .find(|l| l.contains(&format!("\"{key}\"")))
            .map(|l| {
                l.split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .trim_end_matches(',')
                    .to_owned()
            });
        if let Some(v) = v {
            assert_eq!(v, "0", "qemu-img check {image}: {key} = {v}\n{out}");
        }
    }
    assert!(out.contains("\"check-errors\": 0"), "{out}");
}

/// The image's guest view as QEMU sees it.
fn qemu_raw(d: &Dir, image: &str, fmt: &str) -> Vec<u8> {
    let out = format!("{image}.ref.raw");
    qemu_img(d, &["convert", "-f", fmt, "-O", "raw", image, &out]);
    let v = std::fs::read(d.path(&out)).expect("converted image");
    let _ = std::fs::remove_file(d.path(&out));
    v
}

fn open(d: &Dir, image: &str, read_only: bool, cache: Cache) -> Box<dyn DiskImage> {
    open_image(&d.path(image), Format::Qcow2, read_only, cache)
        .unwrap_or_else(|e| panic!("opening {image}: {e}"))
}

fn read_all(img: &dyn DiskImage) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    // In pieces of odd sizes, to cross cluster boundaries at many places.
    let mut at = 0usize;
    let mut step = 3 * 512;
    while at < v.len() {
        let n = step.min(v.len() - at);
        img.read_at(&mut v[at..at + n], at as u64)
            .unwrap_or_else(|e| panic!("read at {at}: {e}"));
        at += n;
        step = if step > 1 << 20 { 3 * 512 } else { step * 3 };
    }
    v
}

/// A deterministic pseudo-random sequence (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

/// Where the vectored transfers' guest buffer starts: it crosses the boundary between the two
/// regions of [`guest`] for transfers longer than 128 KiB.
const GUEST_BUF: u64 = 0x6_0000;

/// Guest memory of two 512 KiB regions (two mappings).
fn guest() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x8_0000),
        (GuestAddress(0x8_0000), 0x8_0000),
    ])
    .expect("guest memory")
}

/// Drives `img` and a plain in-memory copy with the same writes (some straight from guest
/// memory), discards and write-zeroes, reading back both ways.
fn mirror_ops(img: &dyn DiskImage, reference: &mut [u8], seed: u64, ops: usize, max_len: u64) {
    let mut r = Rng(seed);
    let size = img.size();
    for i in 0..ops {
        let len = (1 + r.below(max_len / 512)) * 512;
        let len = len.min(size);
        let off = r.below((size - len) / 512 + 1) * 512;
        let (o, l) = (off as usize, len as usize);
        match r.below(10) {
            0 => {
                img.discard(off, len).expect("discard");
                reference[o..o + l].fill(0);
            }
            1 => {
                img.write_zeroes(off, len, r.below(2) == 0)
                    .expect("write_zeroes");
                reference[o..o + l].fill(0);
            }
            2 => img.flush().expect("flush"),
            3 | 4 => {
                // Straight from guest memory (a buffer across two regions): per-cluster pwritev.
                let data = pattern(seed ^ (i as u64) << 20, l);
                let g = guest();
                g.write_slice(&data, GuestAddress(GUEST_BUF))
                    .expect("guest");
                let v = GuestIov::from_guest(
                    &g,
                    [(GuestAddress(GUEST_BUF), len as u32)],
                    Permissions::Read,
                )
                .expect("iov");
                img.write_vectored(&v, off).expect("write_vectored");
                reference[o..o + l].copy_from_slice(&data);
            }
            _ => {
                let data = pattern(seed ^ (i as u64) << 20, l);
                img.write_at(&data, off).expect("write");
                reference[o..o + l].copy_from_slice(&data);
            }
        }
        if i % 7 == 0 {
            let mut back = vec![0u8; l];
            img.read_at(&mut back, off).expect("read back");
            assert!(back == reference[o..o + l], "op {i}: read back differs");
        }
        if i % 5 == 0 {
            let g = guest();
            let v = GuestIov::from_guest(
                &g,
                [(GuestAddress(GUEST_BUF), len as u32)],
                Permissions::Write,
            )
            .expect("iov");
            img.read_vectored(&v, off).expect("read_vectored");
            let mut back = vec![0u8; l];
            g.read_slice(&mut back, GuestAddress(GUEST_BUF))
                .expect("guest");
            assert!(
                back == reference[o..o + l],
                "op {i}: vectored read back differs"
            );
        }
    }
}

#[test]
fn reads_images_qemu_wrote_all_cluster_sizes_v2_and_v3() {
    let d = Dir::new("read");
    for (cluster, compat) in [
        (512, "1.1"),
        (4096, "0.10"),
        (65536, "1.1"),
        (65536, "0.10"),
        (2 << 20, "1.1"),
    ] {
        let img = format!("r-{cluster}-{compat}.qcow2");
        qemu_img(
            &d,
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cluster},compat={compat}"),
                &img,
                "9M",
            ],
        );
        let mut cmds = vec![
            "write -P 0x11 0 4k".to_string(),
            "write -P 0x22 4608 70000".to_string(),
            "write -P 0x33 1M 2M".to_string(),
            format!("write -P 0x44 {} 512", 9 * 1024 * 1024 - 512),
            "write -P 0x55 5M 1536".to_string(),
        ];
        if compat == "1.1" {
            // Zero clusters: over written data, and over nothing.
            cmds.push("write -z 1M 1M".to_string());
            cmds.push("write -z 7M 1M".to_string());
        }
        qemu_io(&d, "qcow2", &img, &cmds);
        let want = qemu_raw(&d, &img, "qcow2");
        for cache in [Cache::Writeback, Cache::None] {
            for ro in [true, false] {
                let q = open(&d, &img, ro, cache);
                assert_eq!(q.size(), 9 << 20);
                assert!(
                    read_all(&*q) == want,
                    "{img} {cache:?} read-only {ro}: differs from qemu-img convert"
                );
            }
        }
        check_clean(&d, &img);
    }
}

#[test]
fn writes_verified_by_qemu_img_check_and_compare() {
    let d = Dir::new("write");
    let mut n = 0u64;
    for (cluster, compat, refbits) in [
        (512, "1.1", 16),
        (1024, "0.10", 16),
        (4096, "1.1", 1),
        (65536, "1.1", 16),
        (65536, "0.10", 16),
        (65536, "1.1", 64),
        (2 << 20, "1.1", 16),
    ] {
        for cache in [Cache::Writeback, Cache::None] {
            n += 1;
            let img = format!("w-{cluster}-{compat}-{refbits}-{n}.qcow2");
            qemu_img(
                &d,
                &[
                    "create",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!("cluster_size={cluster},compat={compat},refcount_bits={refbits}"),
                    &img,
                    "6M",
                ],
            );
            let mut reference = vec![0u8; 6 << 20];
            {
                let q = open(&d, &img, false, cache);
                mirror_ops(&*q, &mut reference, n * 1000 + cluster, 60, 200_000);
                q.flush().expect("flush");
                assert!(read_all(&*q) == reference, "{img}: our own read-back");
            }
            check_clean(&d, &img);
            assert!(
                qemu_raw(&d, &img, "qcow2") == reference,
                "{img} {cache:?}: qemu sees other data"
            );
            // And QEMU can go on writing it, and we read that.
            qemu_io(
                &d,
                "qcow2",
                &img,
                &[
                    "write -P 0x5a 12345 100000".into(),
                    "read -P 0x5a 12345 100000".into(),
                ],
            );
            reference[12345..112345].fill(0x5a);
            let q = open(&d, &img, true, cache);
            assert!(read_all(&*q) == reference, "{img}: after qemu-io wrote");
        }
    }
}

#[test]
fn raw_and_qcow2_backing_chain_with_copy_on_write() {
    let d = Dir::new("chain");
    std::fs::create_dir_all(d.path("sub")).expect("subdir");
    // base.raw (5 MiB of a pattern), sub/mid.qcow2 over it, top.qcow2 over that: names are
    // relative to the image that holds them.
    let base = pattern(7, 5 << 20);
    std::fs::write(d.path("base.raw"), &base).expect("base");
    qemu_img(
        &d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "../base.raw",
            "-F",
            "raw",
            "sub/mid.qcow2",
            "6M",
        ],
    );
    qemu_io(
        &d,
        "qcow2",
        "sub/mid.qcow2",
        &[
            "write -P 0x61 8192 4096".into(),
            "write -P 0x62 1M 10000".into(),
            "write -z 2M 64k".into(),
            "write -P 0x63 5242880 4096".into(),
        ],
    );
    qemu_img(
        &d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "sub/mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    qemu_io(
        &d,
        "qcow2",
        "top.qcow2",
        &["write -P 0x71 1052672 512".into()],
    );
    let h = read_header(&std::fs::File::open(d.path("top.qcow2")).expect("open")).expect("hdr");
    let b = h.backing.expect("backing");
    assert_eq!(
        (b.name.as_str(), b.format.as_deref()),
        ("sub/mid.qcow2", Some("qcow2"))
    );

    let want = qemu_raw(&d, "top.qcow2", "qcow2");
    assert_eq!(want.len(), 6 << 20);
    for cache in [Cache::Writeback, Cache::None] {
        let q = open(&d, "top.qcow2", true, cache);
        assert!(read_all(&*q) == want, "{cache:?}: chain read differs");
    }

    // Write through ours: partial clusters copy the rest from the chain.
    let mut reference = want.clone();
    let mid_before = std::fs::read(d.path("sub/mid.qcow2")).expect("mid");
    let base_before = std::fs::read(d.path("base.raw")).expect("base");
    {
        let q = open(&d, "top.qcow2", false, Cache::None);
        for (off, len, v) in [
            (100u64, 512usize, 0x81u8),
            (8192 + 1024, 1024, 0x82),
            (1 << 20, 512, 0x83),
            ((2 << 20) + 4096, 512, 0x84),
            ((5 << 20) - 512, 1024, 0x85),
            ((6 << 20) - 512, 512, 0x86),
        ] {
            let o = off as usize;
            q.write_at(&vec![v; len], off).expect("write");
            reference[o..o + len].fill(v);
        }
        q.flush().expect("flush");
    }
    check_clean(&d, "top.qcow2");
    qemu_io(
        &d,
        "qcow2",
        "top.qcow2",
        &[
            "read -P 0x81 100 512".into(),
            "read -P 0x82 9216 1024".into(),
            "read -P 0x85 5242368 1024".into(),
            "read -P 0x86 6290944 512".into(),
        ],
    );
    {
        let q = open(&d, "top.qcow2", false, Cache::Writeback);
        mirror_ops(&*q, &mut reference, 99, 80, 150_000);
        q.flush().expect("flush");
        assert!(read_all(&*q) == reference);
    }
    check_clean(&d, "top.qcow2");
    assert!(qemu_raw(&d, "top.qcow2", "qcow2") == reference);
    std::fs::write(d.path("want.raw"), &reference).expect("reference");
    qemu_img(
        &d,
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "top.qcow2",
            "want.raw",
        ],
    );
    assert!(
        std::fs::read(d.path("sub/mid.qcow2")).expect("mid") == mid_before,
        "the backing image was written"
    );
    assert!(std::fs::read(d.path("base.raw")).expect("base") == base_before);
}

#[test]
fn refcount_table_grows_with_small_clusters() {
    // 512-byte clusters: one refcount table cluster covers 64 blocks of 256 clusters (8 MiB);
    // 24 MiB of writes make it grow twice, moving it to the end of the file.
    let d = Dir::new("grow");
    qemu_img(
        &d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "g.qcow2",
            "32M",
        ],
    );
    let before = read_header(&std::fs::File::open(d.path("g.qcow2")).expect("o")).expect("h");
    let mut reference = vec![0u8; 32 << 20];
    {
        let q = open(&d, "g.qcow2", false, Cache::Writeback);
        for (i, chunk) in (0..24).map(|i| (i, pattern(i, 1 << 20))) {
            q.write_at(&chunk, i << 20).expect("write");
            reference[(i as usize) << 20..((i + 1) as usize) << 20].copy_from_slice(&chunk);
        }
        q.flush().expect("flush");
    }
    let after = read_header(&std::fs::File::open(d.path("g.qcow2")).expect("o")).expect("h");
    assert!(
        after.refcount_table_clusters > before.refcount_table_clusters,
        "{before:?} -> {after:?}"
    );
    check_clean(&d, "g.qcow2");
    assert!(qemu_raw(&d, "g.qcow2", "qcow2") == reference);
}

#[test]
fn concurrent_writers_and_readers_keep_the_image_consistent() {
    let d = Dir::new("threads");
    qemu_img(
        &d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "t.qcow2",
            "16M",
        ],
    );
    let q: Arc<dyn DiskImage> = open(&d, "t.qcow2", false, Cache::None).into();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let q = q.clone();
            std::thread::spawn(move || {
                // Each thread owns every fourth 4 KiB-aligned 3 KiB piece (clusters shared
                // between threads).
                for round in 0..3u64 {
                    for k in 0..256u64 {
                        let off = (k * 4 + t) * 4096 * 4 + round * 512;
                        let v = pattern(t * 1000 + k + round, 3072);
                        q.write_at(&v, off).expect("write");
                        let mut back = vec![0u8; 3072];
                        q.read_at(&mut back, off).expect("read");
                        assert!(back == v, "thread {t} piece {k}");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    q.flush().expect("flush");
    let mut reference = vec![0u8; 16 << 20];
    for round in 0..3u64 {
        for k in 0..256u64 {
            for t in 0..4u64 {
                let off = ((k * 4 + t) * 4096 * 4 + round * 512) as usize;
                reference[off..off + 3072].copy_from_slice(&pattern(t * 1000 + k + round, 3072));
            }
        }
    }
    assert!(read_all(&*q) == reference);
    drop(q);
    check_clean(&d, "t.qcow2");
    assert!(qemu_raw(&d, "t.qcow2", "qcow2") == reference);
}

#[test]
fn tiny_caches_evict_and_write_back_in_order() {
    // Two cached L2 tables and two refcount blocks: almost every request evicts a table or
    // writes dirty ones back in the middle of a write, with and without a backing file, v3 and
    // v2.
    let d = Dir::new("tiny");
    std::fs::write(d.path("base.raw"), pattern(11, 3 << 20)).expect("base");
    for (n, backing, cluster, compat) in [
        (0, false, "512", "1.1"),
        (1, true, "512", "1.1"),
        (2, true, "4096", "1.1"),
        // v2 has no zero flag: discard over a backing file must allocate zeroed clusters.
        (3, true, "4096", "0.10"),
    ] {
        let img = format!("tiny{n}.qcow2");
        let opts = format!("cluster_size={cluster},compat={compat}");
        let mut args = vec!["create", "-f", "qcow2", "-o", &opts];
        if backing {
            args.extend(["-b", "base.raw", "-F", "raw"]);
        }
        args.extend([img.as_str(), "3M"]);
        qemu_img(&d, &args);
        let mut reference = qemu_raw(&d, &img, "qcow2");
        let base = if backing {
            Some(open_image(&d.path("base.raw"), Format::Raw, true, Cache::Writeback).expect("raw"))
        } else {
            None
        };
        {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(d.path(&img))
                .expect("open");
            let q = Qcow2::open(f, base, false)
                .expect("qcow2")
                .with_cache_limits(2, 2);
            mirror_ops(&q, &mut reference, 40 + n, 120, 40_000);
            q.flush().expect("flush");
            assert!(read_all(&q) == reference, "{img}");
        }
        check_clean(&d, &img);
        assert!(qemu_raw(&d, &img, "qcow2") == reference, "{img}");
    }
}

#[test]
fn unflushed_writes_leave_a_consistent_image_and_close_writes_back() {
    let d = Dir::new("crash");
    qemu_img(&d, &["create", "-f", "qcow2", "c.qcow2", "4M"]);
    // Allocating writes, then the process "dies" (no flush, no close): the metadata never
    // reached the file, so the image is as before (clusters past the end, unreferenced).
    let q = Qcow2::open(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.path("c.qcow2"))
            .expect("open"),
        None,
        false,
    )
    .expect("qcow2");
    q.write_at(&[0x11; 65536], 0).expect("write");
    q.write_at(&[0x22; 512], 3 << 20).expect("write");
    std::mem::forget(q);
    check_clean(&d, "c.qcow2");
    // A clean close writes the metadata back.
    {
        let q = open(&d, "c.qcow2", false, Cache::Writeback);
        q.write_at(&[0x33; 1024], 1 << 20).expect("write");
    }
    check_clean(&d, "c.qcow2");
    qemu_io(&d, "qcow2", "c.qcow2", &["read -P 0x33 1M 1024".into()]);
}

/// Opens `image` writable and returns the error text.
fn open_err(d: &Dir, image: &str, read_only: bool) -> String {
    match open_image(&d.path(image), Format::Qcow2, read_only, Cache::Writeback) {
        Ok(_) => panic!("{image} opened"),
        Err(e) => e.to_string(),
    }
}

fn patch(d: &Dir, image: &str, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.path(image))
        .expect("open");
    f.write_all_at(bytes, at).expect("patch");
}

#[test]
fn hostile_and_unsupported_images_give_clean_errors() {
    let d = Dir::new("hostile");
    let fresh = |name: &str| {
        qemu_img(&d, &["create", "-f", "qcow2", name, "8M"]);
        qemu_io(&d, "qcow2", name, &["write -P 0x10 0 128k".into()]);
        name.to_string()
    };
    let hdr = |name: &str| {
        read_header(&std::fs::File::open(d.path(name)).expect("open")).expect("header")
    };
    /// (name, damage done to a fresh image, what the error must say)
    type Case<'a> = (&'a str, Box<dyn Fn(&str) + 'a>, &'a str);
    let cases: Vec<Case> = vec![
        ("magic", Box::new(|n| patch(&d, n, 0, b"QFI\0")), "magic"),
        (
            "version",
            Box::new(|n| patch(&d, n, 4, &[0, 0, 0, 9])),
            "version 9",
        ),
        (
            "clusterbits",
            Box::new(|n| patch(&d, n, 20, &[0, 0, 0, 30])),
            "cluster_bits 30",
        ),
        (
            "crypt",
            Box::new(|n| patch(&d, n, 32, &[0, 0, 0, 1])),
            "encryption",
        ),
        (
            "l1huge",
            Box::new(|n| patch(&d, n, 36, &0x4000_0000u32.to_be_bytes())),
            "L1 table of 1073741824 entries",
        ),
        (
            "l1small",
            Box::new(|n| patch(&d, n, 36, &0u32.to_be_bytes())),
            "too small",
        ),
        (
            "l1unaligned",
            Box::new(|n| patch(&d, n, 40, &0x30008u64.to_be_bytes())),
            "L1 table at 0x30008",
        ),
        (
            "l1pastend",
            Box::new(|n| patch(&d, n, 40, &(1u64 << 40).to_be_bytes())),
            "past the end of the file",
        ),
        (
            "l1onrt",
            Box::new(|n| {
                let h = hdr(n);
                patch(&d, n, 40, &h.refcount_table_offset.to_be_bytes())
            }),
            "overlaps the refcount table",
        ),
        (
            "l2onl1",
            Box::new(|n| {
                // L1 entry 0 points at the L1 table itself.
                let h = hdr(n);
                patch(
                    &d,
                    n,
                    h.l1_table_offset,
                    &(h.l1_table_offset | 1 << 63).to_be_bytes(),
                )
            }),
            "overlaps the header, L1 or refcount table",
        ),
        (
            "l1reserved",
            Box::new(|n| {
                let h = hdr(n);
                patch(&d, n, h.l1_table_offset, &0x1u64.to_be_bytes())
            }),
            "reserved bits",
        ),
        (
            "rtzero",
            Box::new(|n| patch(&d, n, 56, &0u32.to_be_bytes())),
            "refcount table of 0 clusters",
        ),
        (
            "rtblockdup",
            Box::new(|n| {
                let h = hdr(n);
                let mut e = [0u8; 8];
                {
                    use std::os::unix::fs::FileExt;
                    std::fs::File::open(d.path(n))
                        .expect("open")
                        .read_exact_at(&mut e, h.refcount_table_offset)
                        .expect("read");
                }
                patch(&d, n, h.refcount_table_offset + 8, &e)
            }),
            "overlaps other metadata",
        ),
        ("dirty", Box::new(|n| patch(&d, n, 79, &[1])), "dirty bit"),
        (
            "extdata",
            Box::new(|n| patch(&d, n, 79, &[4])),
            "external data file",
        ),
        (
            "unknownfeature",
            Box::new(|n| patch(&d, n, 78, &[1])),
            "unknown incompatible feature bit 8",
        ),
        (
            "refcountorder",
            Box::new(|n| patch(&d, n, 96, &[0, 0, 0, 7])),
            "refcount_order 7",
        ),
        (
            "extension",
            Box::new(|n| patch(&d, n, 112, &[0, 0, 0, 9, 0xff, 0xff, 0, 0])),
            "runs past the first cluster",
        ),
    ];
    for (name, damage, want) in cases {
        let img = fresh(&format!("{name}.qcow2"));
        damage(&img);
        let e = open_err(&d, &img, false);
        assert!(e.contains(want), "{name}: {e:?} should mention {want:?}");
    }

    // L2 entries pointing at metadata or past the file: the request that reaches it fails, others work.
    let img = fresh("l2data.qcow2");
    let h = hdr(&img);
    let mut l1e = [0u8; 8];
    {
        use std::os::unix::fs::FileExt;
        std::fs::File::open(d.path(&img))
            .expect("open")
            .read_exact_at(&mut l1e, h.l1_table_offset)
            .expect("read");
    }
    let l2 = u64::from_be_bytes(l1e) & 0x00ff_ffff_ffff_fe00;
    // Guest cluster 1 -> the L1 table, guest cluster 2 -> far past the end of the file.
    patch(
        &d,
        &img,
        l2 + 8,
        &((1u64 << 63) | h.l1_table_offset).to_be_bytes(),
    );
    patch(&d, &img, l2 + 16, &((1u64 << 63) | (1 << 50)).to_be_bytes());
    let q = open(&d, &img, false, Cache::Writeback);
    let mut b = vec![0u8; 512];
    q.read_at(&mut b, 0).expect("cluster 0 is fine");
    assert!(b.iter().all(|v| *v == 0x10));
    let e = q
        .read_at(&mut b, 65536)
        .expect_err("L1 table as data")
        .to_string();
    assert!(e.contains("overlaps metadata"), "{e}");
    let e = q
        .write_at(&b, 65536)
        .expect_err("L1 table as data")
        .to_string();
    assert!(e.contains("overlaps metadata"), "{e}");
    let e = q.read_at(&mut b, 131072).expect_err("past end").to_string();
    assert!(e.contains("past the end"), "{e}");
    drop(q);

    // Compressed clusters are refused when read (the rest of the image works).
    let d2 = &d;
    // Compressible data (random data would be stored uncompressed).
    let plain: Vec<u8> = (0..1u32 << 20).map(|i| (i % 7) as u8 + 1).collect();
    std::fs::write(d.path("plain.raw"), plain).expect("raw");
    qemu_img(
        d2,
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "plain.raw",
            "comp.qcow2",
        ],
    );
    qemu_io(d2, "qcow2", "comp.qcow2", &["write -P 0x99 0 64k".into()]);
    let q = open(&d, "comp.qcow2", false, Cache::Writeback);
    q.read_at(&mut b, 0)
        .expect("a cluster written after compression");
    let e = q
        .read_at(&mut b, 65536)
        .expect_err("compressed")
        .to_string();
    assert!(e.contains("compressed"), "{e}");
    let e = q.write_at(&b, 65536).expect_err("compressed").to_string();
    assert!(e.contains("compressed"), "{e}");
    drop(q);

    // Internal snapshots: read-only only.
    let img = fresh("snap.qcow2");
    qemu_img(&d, &["snapshot", "-c", "s1", &img]);
    let e = open_err(&d, &img, false);
    assert!(e.contains("snapshot"), "{e}");
    let q = open(&d, &img, true, Cache::Writeback);
    q.read_at(&mut b, 0).expect("read");
    assert!(b.iter().all(|v| *v == 0x10));
    drop(q);

    // Backing chains: a loop, a missing format, a protocol name, a missing file.
    qemu_img(&d, &["create", "-f", "qcow2", "loop-a.qcow2", "1M"]);
    qemu_img(
        &d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "loop-a.qcow2",
            "-F",
            "qcow2",
            "loop-b.qcow2",
        ],
    );
    qemu_img(
        &d,
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "loop-b.qcow2",
            "-F",
            "qcow2",
            "loop-a.qcow2",
        ],
    );
    let e = open_err(&d, "loop-a.qcow2", false);
    assert!(e.contains("loop"), "{e}");
    std::fs::write(d.path("b.raw"), [0u8; 4096]).expect("raw");
    qemu_img(
        &d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "b.raw",
            "-F",
            "raw",
            "nofmt.qcow2",
            "1M",
        ],
    );
    // Drop the backing format extension (type 0xe2792aca right after the 112-byte header).
    let raw = std::fs::read(d.path("nofmt.qcow2")).expect("read");
    assert_eq!(&raw[112..116], &[0xe2, 0x79, 0x2a, 0xca]);
    patch(&d, "nofmt.qcow2", 112, &[0x12, 0x34, 0x56, 0x78]);
    let e = open_err(&d, "nofmt.qcow2", false);
    assert!(e.contains("records no backing format"), "{e}");
    qemu_img(
        &d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "gone.raw",
            "-F",
            "raw",
            "-u",
            "gone.qcow2",
            "1M",
        ],
    );
    let e = open_err(&d, "gone.qcow2", false);
    assert!(e.contains("gone.raw"), "{e}");
}

#[test]
fn preallocated_metadata_and_zero_clusters_are_written_in_place() {
    let d = Dir::new("prealloc");
    qemu_img(
        &d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "p.qcow2",
            "2M",
        ],
    );
    let len = std::fs::metadata(d.path("p.qcow2")).expect("md").len();
    let mut reference = vec![0u8; 2 << 20];
    {
        let q = open(&d, "p.qcow2", false, Cache::Writeback);
        mirror_ops(&*q, &mut reference, 5, 40, 100_000);
        // Discard a whole cluster, then write part of it again: zeroes around the new data.
        q.discard(65536, 65536).expect("discard");
        q.write_at(&[0xee; 512], 65536 + 1024).expect("write");
        reference[65536..131072].fill(0);
        reference[65536 + 1024..65536 + 1536].fill(0xee);
        assert!(read_all(&*q) == reference);
    }
    check_clean(&d, "p.qcow2");
    assert!(qemu_raw(&d, "p.qcow2", "qcow2") == reference);
    // Every guest cluster was preallocated, so nothing was appended.
    assert_eq!(std::fs::metadata(d.path("p.qcow2")).expect("md").len(), len);
}

#[test]
fn direct_io_on_a_fresh_image_with_aligned_and_unaligned_buffers() {
    // A fresh 64 KiB-cluster image ends 16 bytes into its L1 cluster: the first metadata
    // write-back reaches an unaligned end of file (buffered tail fd under O_DIRECT).
    let d = Dir::new("direct");
    for (n, cluster) in [(0, "65536"), (1, "512")] {
        let img = format!("d{n}.qcow2");
        qemu_img(
            &d,
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cluster}"),
                &img,
                "1M",
            ],
        );
        let mut reference = vec![0u8; 1 << 20];
        {
            let q = open(&d, &img, false, Cache::None);
            assert!(read_all(&*q) == reference);
            q.flush().expect("flush of nothing");
            // Aligned buffers go to the file directly; unaligned ones through a bounce.
            let mut a = AlignedBuf::new(8192).expect("aligned");
            a.as_mut_slice().fill(0xa1);
            q.write_at(a.as_slice(), 65536).expect("aligned write");
            reference[65536..73728].fill(0xa1);
            q.write_at(&[0xb2; 1536], 1024).expect("unaligned write");
            reference[1024..2560].fill(0xb2);
            q.flush().expect("flush");
            let mut back = AlignedBuf::new(12288).expect("aligned");
            q.read_at(back.as_mut_slice(), 61440).expect("aligned read");
            assert!(back.as_slice() == &reference[61440..73728]);
            assert!(read_all(&*q) == reference);
        }
        check_clean(&d, &img);
        assert!(qemu_raw(&d, &img, "qcow2") == reference, "{img}");
    }
}

#[test]
fn randomly_damaged_metadata_never_panics() {
    // Bytes flipped at random in the header, refcount table and block, L1 and L2 tables of a
    // written image: opening, reading, writing, discarding and flushing may fail, but only with
    // an error (a panic fails the test), and never with an allocation bigger than the tables'
    // bounds.
    let d = Dir::new("fuzz");
    for cluster in [512u64, 65536] {
        let img = format!("pristine-{cluster}.qcow2");
        qemu_img(
            &d,
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cluster}"),
                &img,
                "4M",
            ],
        );
        qemu_io(
            &d,
            "qcow2",
            &img,
            &["write -P 0x42 0 1M".into(), "write -z 2M 64k".into()],
        );
        let pristine = std::fs::read(d.path(&img)).expect("image");
        // Metadata lies in the first clusters (header, refcount table and block, L1, first L2).
        let meta_end = (cluster * 6).min(pristine.len() as u64);
        let mut r = Rng(cluster);
        let (mut opened, mut failed_io) = (0, 0);
        for round in 0..150 {
            let mut bad = pristine.clone();
            for _ in 0..1 + r.below(4) {
                let at = r.below(meta_end) as usize;
                bad[at] ^= 1 << r.below(8);
            }
            let name = format!("fuzz-{cluster}.qcow2");
            std::fs::write(d.path(&name), &bad).expect("write");
            let Ok(q) = open_image(&d.path(&name), Format::Qcow2, false, Cache::Writeback) else {
                continue;
            };
            opened += 1;
            let n = q.size().min(4 << 20) as usize / 512 * 512;
            let mut buf = vec![0u8; n];
            if q.read_at(&mut buf, 0).is_err() {
                failed_io += 1;
            }
            let len = (n as u64).min(200_000) / 512 * 512;
            let _ = q.write_at(&pattern(round, len as usize), 0);
            let _ = q.discard(0, len.min(65536));
            let _ = q.write_zeroes(0, len.min(4096), true);
            let _ = q.flush();
        }
        // Most flips hit bytes nothing reads; some are caught at open, some per request.
        assert!(opened > 0 && opened < 150, "{cluster}: opened {opened}/150");
        eprintln!("{cluster}: opened {opened}/150, reads refused on {failed_io}");
    }
}
