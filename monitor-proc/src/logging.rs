//! A minimal logger for the `log` facade: `bulkhead: message` on stderr, as QEMU prints its
//! diagnostics, with the level as a prefix below warnings. The level comes from `BULKHEAD_LOG`
//! (`error`, `warn`, `info`, `debug`, `trace`; default `warn`).

use std::io::Write;

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let prefix = match record.level() {
            log::Level::Error | log::Level::Warn => "",
            log::Level::Info => "info: ",
            log::Level::Debug => "debug: ",
            log::Level::Trace => "trace: ",
        };
        // One write per line, so lines from concurrent writers do not interleave.
        let line = format!("bulkhead: {prefix}{}\n", record.args());
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger; the level is taken from `BULKHEAD_LOG`.
pub fn init() {
    let level = std::env::var("BULKHEAD_LOG")
        .ok()
        .and_then(|v| v.parse::<log::LevelFilter>().ok())
        .unwrap_or(log::LevelFilter::Warn);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
