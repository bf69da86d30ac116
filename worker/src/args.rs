//! The worker-mode command line of a back end the monitor launches:
//! `--ipc-fd N [--sandbox on|off|allow-weak] [--mem-bytes N] [--queues N]`.

use std::os::fd::RawFd;

use bulkhead_sandbox::{Mode, Params, REPORT_FD};

/// A bad worker-mode command line (the message; the program adds its usage).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ArgsError(pub String);

/// The worker-mode command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerArgs {
    /// The ipc socket's fd.
    pub ipc_fd: RawFd,
    /// How to confine.
    pub mode: Mode,
    /// What the limits depend on: guest memory the front end may share (the monitor passes
    /// twice the guest RAM: old and new memory tables can be mapped at once) and queues.
    pub params: Params,
}

impl WorkerArgs {
    /// Worker mode is selected by `--ipc-fd` as the first argument; `None` otherwise (the
    /// program's standalone command line). `--queues` takes 1 to `max_queues`.
    pub fn parse(args: &[String], max_queues: u32) -> Option<Result<WorkerArgs, ArgsError>> {
        if args.first().map(String::as_str) != Some("--ipc-fd") {
            return None;
        }
        Some(Self::parse_worker(args, max_queues))
    }

    fn parse_worker(args: &[String], max_queues: u32) -> Result<WorkerArgs, ArgsError> {
        let usage = ArgsError;
        let mut ipc_fd = None;
        let mut mode = Mode::On;
        let mut params = Params::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().ok_or_else(|| usage(format!("{a} needs a value")));
            match a.as_str() {
                "--ipc-fd" => {
                    let v = value()?;
                    ipc_fd = Some(
                        v.parse::<RawFd>()
                            .ok()
                            .filter(|&fd| fd >= 3 && fd != REPORT_FD)
                            .ok_or_else(|| usage(format!("--ipc-fd {v}: 3 or more, not 4")))?,
                    );
                }
                "--sandbox" => {
                    let v = value()?;
                    mode = Mode::from_name(v)
                        .ok_or_else(|| usage(format!("--sandbox {v}: on, off or allow-weak")))?;
                }
                "--mem-bytes" => {
                    let v = value()?;
                    params.mem_bytes = v
                        .parse()
                        .map_err(|_| usage(format!("--mem-bytes {v}: a number")))?;
                }
                "--queues" => {
                    let v = value()?;
                    params.queues = v
                        .parse()
                        .ok()
                        .filter(|q| (1..=max_queues).contains(q))
                        .ok_or_else(|| usage(format!("--queues {v}: 1 to {max_queues}")))?;
                }
                other => return Err(usage(format!("unknown argument {other:?}"))),
            }
        }
        let ipc_fd = ipc_fd.ok_or_else(|| usage("--ipc-fd is required".into()))?;
        Ok(WorkerArgs {
            ipc_fd,
            mode,
            params,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(s: &str) -> Option<Result<WorkerArgs, ArgsError>> {
        let v: Vec<String> = s.split_whitespace().map(String::from).collect();
        WorkerArgs::parse(&v, 16)
    }

    #[test]
    fn worker_mode_is_chosen_by_ipc_fd_first() {
        assert!(args("--socket /s --file /f").is_none());
        let a = args("--ipc-fd 3 --sandbox allow-weak --mem-bytes 1024 --queues 4")
            .unwrap()
            .unwrap();
        assert_eq!(a.ipc_fd, 3);
        assert_eq!(a.mode, Mode::AllowWeak);
        assert_eq!(a.params.mem_bytes, 1024);
        assert_eq!(a.params.queues, 4);
        assert_eq!(
            args("--ipc-fd 3 --queues 17").unwrap(),
            Err(ArgsError("--queues 17: 1 to 16".into()))
        );
        for bad in [
            "--ipc-fd 4",
            "--ipc-fd 2",
            "--ipc-fd 3 --queues 0",
            "--ipc-fd 3 --sandbox maybe",
            "--ipc-fd 3 --mem-bytes lots",
            "--ipc-fd 3 --file /f",
            "--ipc-fd",
        ] {
            assert!(args(bad).unwrap().is_err(), "{bad}");
        }
    }
}
