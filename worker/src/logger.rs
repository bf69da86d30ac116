//! A minimal stderr logger (stderr is the worker's log channel to the monitor). Each line is
//! `<program>[pid] LEVEL target: message`; the level comes from `BULKHEAD_LOG` (off, error, warn,
//! info, debug, trace; default info).

use std::sync::OnceLock;

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    /// The program name the lines start with (set by the first [`init`]).
    program: OnceLock<&'static str>,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "{}[{}] {} {}: {}",
                self.program.get().copied().unwrap_or("bulkhead"),
                std::process::id(),
                record.level(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger {
    program: OnceLock::new(),
};

/// Parses a level name (any case).
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    match s.to_ascii_lowercase().as_str() {
        "off" => Some(LevelFilter::Off),
        "error" => Some(LevelFilter::Error),
        "warn" => Some(LevelFilter::Warn),
        "info" => Some(LevelFilter::Info),
        "debug" => Some(LevelFilter::Debug),
        "trace" => Some(LevelFilter::Trace),
        _ => None,
    }
}

/// Installs the logger for `program` (e.g. `bulkhead-blockd`) at the level `BULKHEAD_LOG`
/// names (unset or unknown: info). Idempotent: the first call's program and level stay.
pub fn init(program: &'static str) {
    let level = std::env::var("BULKHEAD_LOG")
        .ok()
        .and_then(|s| parse_level(&s))
        .unwrap_or(LevelFilter::Info);
    let _ = LOGGER.program.set(program);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        assert_eq!(parse_level("WARN"), Some(LevelFilter::Warn));
        assert_eq!(parse_level("off"), Some(LevelFilter::Off));
        assert_eq!(parse_level("trace"), Some(LevelFilter::Trace));
        assert_eq!(parse_level("loud"), None);
    }
}
