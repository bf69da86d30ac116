//! Line-oriented capture of a byte stream (a serial console) with blocking waits.
//!
//! A reader thread appends everything it reads to a log file and to an in-memory list of lines
//! (`\r` removed, invalid UTF-8 replaced). Tests wait for a line containing a pattern, starting at
//! a *mark* (a line index) so that "the marker appeared a second time" is easy to express.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::util::tail_lines;

/// Lines whose appearance makes every wait fail immediately (the guest cannot recover).
const FATAL_PATTERNS: &[&str] = &["Kernel panic - not syncing"];

#[derive(Default)]
struct State {
    lines: Vec<String>,
    partial: Vec<u8>,
    closed: bool,
}

/// A captured console stream; cheap to clone (shared state).
#[derive(Clone)]
pub struct ConsoleLog {
    name: String,
    log_path: PathBuf,
    shared: Arc<(Mutex<State>, Condvar)>,
}

/// Position in a [`ConsoleLog`]: the number of complete lines seen at some point.
pub type Mark = usize;

impl ConsoleLog {
    /// Starts capturing `reader` on a background thread, mirroring raw bytes to `log_path`.
    pub fn capture<R: Read + Send + 'static>(
        name: &str,
        reader: R,
        log_path: &Path,
    ) -> Result<Self> {
        let log = ConsoleLog {
            name: name.to_owned(),
            log_path: log_path.to_path_buf(),
            shared: Arc::new((Mutex::new(State::default()), Condvar::new())),
        };
        let mut file = File::create(log_path)?;
        let shared = Arc::clone(&log.shared);
        let mut reader = reader;
        std::thread::Builder::new()
            .name(format!("console-{name}"))
            .spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    };
                    let _ = file.write_all(&buf[..n]);
                    let (lock, cv) = &*shared;
                    let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
                    for &b in &buf[..n] {
                        match b {
                            b'\n' => {
                                let line = String::from_utf8_lossy(&st.partial).into_owned();
                                st.partial.clear();
                                st.lines.push(line);
                            }
                            b'\r' => {}
                            b => st.partial.push(b),
                        }
                    }
                    cv.notify_all();
                }
                let _ = file.flush();
                let (lock, cv) = &*shared;
                let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
                if !st.partial.is_empty() {
                    let line = String::from_utf8_lossy(&st.partial).into_owned();
                    st.partial.clear();
                    st.lines.push(line);
                }
                st.closed = true;
                cv.notify_all();
            })?;
        Ok(log)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Name given at capture time (used in error messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Host path of the raw log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The current end of the stream (number of complete lines).
    pub fn mark(&self) -> Mark {
        self.state().lines.len()
    }

    /// Complete lines from `from` on.
    pub fn lines_since(&self, from: Mark) -> Vec<String> {
        let st = self.state();
        st.lines
            .get(from..)
            .map(<[String]>::to_vec)
            .unwrap_or_default()
    }

    /// Whether the stream has ended (the peer closed it).
    pub fn is_closed(&self) -> bool {
        self.state().closed
    }

    /// The last `n` lines (including an unterminated last line).
    pub fn tail(&self, n: usize) -> String {
        let st = self.state();
        let mut text = st.lines[st.lines.len().saturating_sub(n)..].join("\n");
        if !st.partial.is_empty() {
            text.push('\n');
            text.push_str(&String::from_utf8_lossy(&st.partial));
        }
        tail_lines(&text, n)
    }

    /// Index of the first line at or after `from` that contains `pattern`, if any (no waiting).
    pub fn find(&self, from: Mark, pattern: &str) -> Option<(Mark, String)> {
        let st = self.state();
        st.lines
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, l)| l.contains(pattern))
            .map(|(i, l)| (i, l.clone()))
    }

    /// Number of lines at or after `from` that contain `pattern`.
    pub fn count(&self, from: Mark, pattern: &str) -> usize {
        let st = self.state();
        st.lines
            .iter()
            .skip(from)
            .filter(|l| l.contains(pattern))
            .count()
    }

    /// Waits up to `timeout` for a line at or after `from` for which `pred` is true and returns
    /// its index and text. Fails early when the stream closes or the guest panics; `check` is
    /// called about every `check_every` and may fail the wait (e.g. "the VMM exited").
    pub fn wait_until(
        &self,
        from: Mark,
        what: &str,
        timeout: Duration,
        pred: &dyn Fn(&str) -> bool,
        check: &mut dyn FnMut() -> Result<()>,
        check_every: Duration,
    ) -> Result<(Mark, String)> {
        let deadline = Instant::now() + timeout;
        let mut next_check = Instant::now() + check_every;
        let (lock, cv) = &*self.shared;
        let mut scanned = from;
        loop {
            let st = lock.lock().unwrap_or_else(|e| e.into_inner());
            while scanned < st.lines.len() {
                let line = &st.lines[scanned];
                if pred(line) {
                    return Ok((scanned, line.clone()));
                }
                if let Some(p) = FATAL_PATTERNS.iter().find(|p| line.contains(*p)) {
                    let line = line.clone();
                    drop(st);
                    // Give the rest of the panic message a moment to arrive.
                    std::thread::sleep(Duration::from_millis(500));
                    bail!(
                        "{} showed {p:?} while waiting for {what}: {line}\n--- {} (tail) ---\n{}",
                        self.name,
                        self.name,
                        self.tail(60)
                    );
                }
                scanned += 1;
            }
            if st.closed {
                drop(st);
                bail!(
                    "{} closed while waiting for {what}\n--- {} (tail) ---\n{}",
                    self.name,
                    self.name,
                    self.tail(60)
                );
            }
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                bail!(
                    "timed out after {:.0?} waiting for {what} on {} (log {})\n--- {} (tail) ---\n{}",
                    timeout,
                    self.name,
                    self.log_path.display(),
                    self.name,
                    self.tail(60)
                );
            }
            if now >= next_check {
                drop(st);
                check()?;
                next_check = Instant::now() + check_every;
                continue;
            }
            let wait = deadline.min(next_check) - now;
            let (g, _) = cv.wait_timeout(st, wait).unwrap_or_else(|e| e.into_inner());
            drop(g);
        }
    }

    /// Waits up to `timeout` for a line at or after `from` containing `pattern`.
    pub fn wait_for(&self, from: Mark, pattern: &str, timeout: Duration) -> Result<(Mark, String)> {
        self.wait_until(
            from,
            &format!("{pattern:?}"),
            timeout,
            &|l| l.contains(pattern),
            &mut || Ok(()),
            timeout,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_and_marks() {
        let (mut a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let dir = std::env::temp_dir().join(format!("console-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let log = ConsoleLog::capture("test", b, &dir.join("log")).expect("capture");
        a.write_all(b"hello\r\nUP one\npartial").expect("write");
        let (i, line) = log
            .wait_for(0, "UP", Duration::from_secs(5))
            .expect("first");
        assert_eq!((i, line.as_str()), (1, "UP one"));
        assert!(log
            .wait_for(i + 1, "UP", Duration::from_millis(100))
            .is_err());
        a.write_all(b" line\nUP two\n").expect("write");
        let (j, line) = log
            .wait_for(i + 1, "UP", Duration::from_secs(5))
            .expect("second");
        assert_eq!((j, line.as_str()), (3, "UP two"));
        assert_eq!(log.lines_since(2), ["partial line", "UP two"]);
        assert_eq!(log.count(0, "UP"), 2);
        a.write_all(b"Kernel panic - not syncing: boom\n")
            .expect("write");
        let err = log
            .wait_for(0, "never", Duration::from_secs(5))
            .expect_err("panic");
        assert!(err.to_string().contains("Kernel panic"), "{err}");
        drop(a);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
