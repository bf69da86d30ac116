//! The Debian package: `packaging/build-deb.sh` builds a .deb from the release binaries whose
//! layout lets the installed monitor find its workers (next to its own executable, through the
//! `/usr/bin/bulkhead` symlink), and which ships the systemd unit.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bulkhead_tests::kit::{self, GuestKit};
use bulkhead_tests::util::workspace_root;
use bulkhead_tests::Qmp;

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn deb_package_installs_a_working_layout() -> Result<()> {
    let bins = kit::bin_dir();
    kit::bulkhead_binaries(&bins)?; // fails loudly if the release binaries are not built
    let scratch = tempdir("deb")?;
    let deb = run(
        Command::new(workspace_root().join("packaging/build-deb.sh"))
            .arg(scratch.join("out"))
            .env("BULKHEAD_BIN_DIR", &bins),
    )?;
    let deb = Path::new(deb.trim()).to_path_buf();

    // Control fields.
    let fields = run(Command::new("dpkg-deb")
        .arg("-f")
        .arg(&deb)
        .args(["Package", "Version"]))?;
    ensure!(fields.contains("Package: bulkhead"), "{fields}");
    ensure!(
        fields.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))),
        "{fields}"
    );

    // Contents.
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb))?;
    for want in [
        "./usr/libexec/bulkhead/bulkhead",
        "./usr/libexec/bulkhead/bulkhead-vcpu",
        "./usr/libexec/bulkhead/bulkhead-blockd",
        "./usr/libexec/bulkhead/bulkhead-netd",
        "./usr/bin/bulkhead -> ../libexec/bulkhead/bulkhead",
        "./lib/systemd/system/bulkhead@.service",
        "./etc/bulkhead/example.conf",
    ] {
        ensure!(
            listing.contains(want),
            "{want} missing from the package:\n{listing}"
        );
    }
    let unit =
        std::fs::read_to_string(workspace_root().join("packaging/systemd/bulkhead@.service"))?;
    ensure!(
        unit.contains("ExecStart=/usr/libexec/bulkhead/bulkhead "),
        "{unit}"
    );

    // Unpacked, the symlinked monitor finds the packaged worker and sets up a real guest
    // (kept in prelaunch with -S, so this needs no guest to run on this host's KVM).
    let root = scratch.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let kit = GuestKit::get()?;
    let sock = scratch.join("qmp.sock");
    let mut child = Command::new(root.join("usr/bin/bulkhead"))
        .args(["-m", "64", "-S", "-nographic", "-serial", "none", "-kernel"])
        .arg(&kit.l2_bzimage)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let result = (|| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut qmp = loop {
            match Qmp::connect_unix(&sock, Duration::from_secs(10)) {
                Ok(q) => break q,
                Err(e) if Instant::now() > deadline => bail!("QMP never came up: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let (status, running) = qmp.query_status()?;
        ensure!(status == "prelaunch" && !running, "status {status}");
        // The worker the monitor had started is the packaged one. It is the child of the
        // monitor's launcher (itself the monitor's child, running the monitor's binary).
        let children = |pid: u32| -> Result<Vec<u32>> {
            // pgrep exits 1 when there is no match: that is an empty list here.
            let out = Command::new("pgrep")
                .args(["-P", &pid.to_string()])
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect())
        };
        let launcher = children(child.id())?;
        let launcher = launcher.first().context("no launcher")?;
        let exe = std::fs::read_link(format!("/proc/{launcher}/exe"))?;
        ensure!(
            exe == root.join("usr/libexec/bulkhead/bulkhead"),
            "launcher runs {}",
            exe.display()
        );
        let workers = children(*launcher)?;
        let worker = workers.first().context("no worker")?;
        let exe = std::fs::read_link(format!("/proc/{worker}/exe"))?;
        ensure!(
            exe == root.join("usr/libexec/bulkhead/bulkhead-vcpu"),
            "worker runs {}",
            exe.display()
        );
        qmp.execute("quit", None)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait()?;
    result?;
    ensure!(status.success(), "bulkhead exited with {status}");
    std::fs::remove_dir_all(&scratch)?;
    Ok(())
}

fn tempdir(label: &str) -> Result<std::path::PathBuf> {
    let dir = workspace_root()
        .join("target/test-scratch")
        .join(format!("{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
