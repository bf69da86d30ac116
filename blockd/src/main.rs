//! `bulkhead-blockd`: the virtio-blk back end (issue 5). Not implemented yet: the binary exists so the
//! process layout is complete, and it refuses to run rather than pretend to serve a device.

fn main() -> std::process::ExitCode {
    eprintln!("bulkhead-blockd: not implemented yet: the virtio-blk back end (issue 5) is not built in this version");
    std::process::ExitCode::from(1)
}
