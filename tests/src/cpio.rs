//! Writer for `newc` ("SVR4 without CRC") cpio archives, the format Linux unpacks as an initramfs.
//!
//! Only what an initramfs needs is supported: directories, regular files, symbolic links and
//! character devices. Parent directories are created implicitly (mode 0755) the first time a path
//! below them is added, so callers can add `bin/sh` without adding `bin` first. All entries get
//! uid/gid 0 and mtime 0 so that archives are reproducible.
//!
//! Linux accepts several archives concatenated into one initrd (each ending with its own
//! `TRAILER!!!`); entries of a later archive replace files of the same name from an earlier one.
//! That is how the harness appends the frequently rebuilt Bulkhead binaries to a cached base
//! archive.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Streaming `newc` cpio writer.
///
/// Call [`CpioWriter::finish`] at the end; dropping the writer without it leaves an archive
/// without trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    /// Bytes written so far (for 4-byte alignment).
    offset: u64,
    next_ino: u32,
    /// Directories already emitted (normalised, without leading `/`).
    dirs: BTreeSet<String>,
}

/// Normalises an archive path: strips leading `/` and `./`, rejects empty paths and `..`.
fn normalise(path: &str) -> io::Result<String> {
    let trimmed = path.trim_start_matches('/');
    let trimmed = trimmed.strip_prefix("./").unwrap_or(trimmed);
    let trimmed = trimmed.trim_end_matches('/');
    if trimmed.is_empty() || trimmed.split('/').any(|c| c == ".." || c.is_empty()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid cpio path {path:?}"),
        ));
    }
    Ok(trimmed.to_owned())
}

impl<W: Write> CpioWriter<W> {
    /// Starts a new archive written to `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            offset: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (4 - (self.offset % 4) as usize) % 4;
        if rem != 0 {
            self.out.write_all(&[0u8; 3][..rem])?;
            self.offset += rem as u64;
        }
        Ok(())
    }

    /// Writes one raw entry (header, name, data), without touching parent directories.
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: file too large for newc cpio"),
            )
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let namesize = name.len() + 1; // including NUL
        let header = format!(
            "070701{ino:08X}{mode:08X}{uid:08X}{gid:08X}{nlink:08X}{mtime:08X}{size:08X}\
             {devmajor:08X}{devminor:08X}{rmaj:08X}{rmin:08X}{namesize:08X}{check:08X}",
            uid = 0,
            gid = 0,
            mtime = 0,
            devmajor = 0,
            devminor = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            check = 0,
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.offset += (header.len() + namesize) as u64;
        self.pad()?;
        self.out.write_all(data)?;
        self.offset += data.len() as u64;
        self.pad()
    }

    /// Emits all missing parent directories of `path` (already normalised).
    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut acc = String::new();
        let comps: Vec<&str> = path.split('/').collect();
        for comp in &comps[..comps.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(comp);
            if !self.dirs.contains(&acc) {
                self.entry(&acc, S_IFDIR | 0o755, (0, 0), &[])?;
                self.dirs.insert(acc.clone());
            }
        }
        Ok(())
    }

    /// Adds a directory with permission bits `perm` (e.g. `0o755`). Adding an existing directory
    /// again is a no-op.
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        let path = normalise(path)?;
        if self.dirs.contains(&path) {
            return Ok(());
        }
        self.parents(&path)?;
        self.entry(&path, S_IFDIR | (perm & 0o7777), (0, 0), &[])?;
        self.dirs.insert(path);
        Ok(())
    }

    /// Adds a regular file with the given contents and permission bits.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let path = normalise(path)?;
        self.parents(&path)?;
        self.entry(&path, S_IFREG | (perm & 0o7777), (0, 0), data)
    }

    /// Adds a regular file read from `src` on the host (symbolic links are followed); the
    /// permission bits are taken from the host file.
    pub fn file_from_host(&mut self, path: &str, src: &Path) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let data = fs::read(src)
            .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", src.display())))?;
        let perm = fs::metadata(src)?.permissions().mode();
        self.file(path, perm, &data)
    }

    /// Adds a symbolic link `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = normalise(path)?;
        self.parents(&path)?;
        self.entry(&path, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let path = normalise(path)?;
        self.parents(&path)?;
        self.entry(&path, S_IFCHR | (perm & 0o7777), (major, minor), &[])
    }

    /// Writes the trailer, pads the archive to a multiple of 512 bytes and returns the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        let rem = (512 - (self.offset % 512) as usize) % 512;
        self.out.write_all(&vec![0u8; rem])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a newc archive back into (name, mode, data) tuples.
    fn parse(buf: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 0usize;
        let field = |b: &[u8], i: usize| {
            let s = std::str::from_utf8(&b[6 + i * 8..6 + (i + 1) * 8]).expect("hex");
            u32::from_str_radix(s, 16).expect("hex")
        };
        loop {
            let h = &buf[off..off + 110];
            assert_eq!(&h[..6], b"070701");
            let mode = field(h, 1);
            let size = field(h, 6) as usize;
            let namesize = field(h, 11) as usize;
            let name = std::str::from_utf8(&buf[off + 110..off + 110 + namesize - 1])
                .expect("utf8")
                .to_owned();
            off = (off + 110 + namesize).div_ceil(4) * 4;
            let data = buf[off..off + size].to_vec();
            off = (off + size).div_ceil(4) * 4;
            if name == "TRAILER!!!" {
                break;
            }
            out.push((name, mode, data));
        }
        out
    }

    #[test]
    fn round_trip_with_implicit_parents() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/bin/sub/hello", 0o755, b"hi there").expect("file");
        w.symlink("bin/sh", "busybox").expect("symlink");
        w.char_dev("dev/console", 0o600, 5, 1).expect("dev");
        w.dir("bin", 0o755).expect("dir again is a no-op");
        let buf = w.finish().expect("finish");
        assert_eq!(buf.len() % 512, 0);
        let entries = parse(&buf);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sub",
                "bin/sub/hello",
                "bin/sh",
                "dev",
                "dev/console"
            ]
        );
        assert_eq!(entries[2].1, S_IFREG | 0o755);
        assert_eq!(entries[2].2, b"hi there");
        assert_eq!(entries[3].1, S_IFLNK | 0o777);
        assert_eq!(entries[3].2, b"busybox");
        assert_eq!(entries[5].1, S_IFCHR | 0o600);
    }

    #[test]
    fn rejects_bad_paths() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("", 0o644, b"").is_err());
        assert!(w.file("a/../b", 0o644, b"").is_err());
        assert!(w.file("a//b", 0o644, b"").is_err());
    }
}
