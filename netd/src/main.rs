//! `bulkhead-netd`: the virtio-net back end (issue 6). Not implemented yet: the binary exists so the
//! process layout is complete, and it refuses to run rather than pretend to serve a device.

fn main() -> std::process::ExitCode {
    eprintln!("bulkhead-netd: not implemented yet: the virtio-net back end (issue 6) is not built in this version");
    std::process::ExitCode::from(1)
}
