//! The DHCP server on the tap's far side in the network tests: busybox `udhcpd` (the kit's
//! busybox, the same binary on the host and in L1) with a small config of the test's own, and
//! busybox `dumpleases` to read its lease file back.
//!
//! The server hands out [`POOL_START`]..=[`POOL_END`] in 10.77.0.0/24 with
//! [`crate::kit::NET_PEER_ADDR`] (the far side's own address, where the HTTP server listens) as
//! the router; the kit's net modes take their address from it (`udhcpc`, see
//! [`crate::kit::L2_INIT`]) and ping and fetch from the router. A test checks the guest's lease
//! with [`check_lease`]: the guest's `BULKHEAD-NET-DHCP=` address is in the pool and the
//! server's lease file binds it to the guest's MAC.

use std::net::Ipv4Addr;

use anyhow::{bail, ensure, Context, Result};

use crate::kit::NET_PEER_ADDR;

/// First address of the server's pool.
pub const POOL_START: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
/// Last address of the server's pool.
pub const POOL_END: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 149);
/// Lease time the server grants, seconds (longer than any test; the guest does not renew).
pub const LEASE_SECS: u32 = 600;

/// The `udhcpd` config: the pool, /24, the far side as router, serving `interface` only, with
/// its lease file and pid file at the given paths.
pub fn udhcpd_conf(interface: &str, lease_file: &str, pid_file: &str) -> String {
    format!(
        "# busybox udhcpd, written by bulkhead-tests\n\
         interface {interface}\n\
         start {POOL_START}\n\
         end {POOL_END}\n\
         max_leases 50\n\
         lease_file {lease_file}\n\
         pidfile {pid_file}\n\
         option subnet 255.255.255.0\n\
         option router {NET_PEER_ADDR}\n\
         option lease {LEASE_SECS}\n"
    )
}

/// Whether `ip` is in the server's pool.
pub fn in_pool(ip: Ipv4Addr) -> bool {
    (POOL_START..=POOL_END).contains(&ip)
}

/// One lease from `dumpleases`: the client's MAC (lower case) and its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub mac: String,
    pub ip: Ipv4Addr,
}

/// Parses busybox `dumpleases` output: a header line (`Mac Address       IP Address ...`), then
/// one line per lease starting with the MAC and the address (a host name and the remaining
/// time follow).
pub fn parse_dumpleases(text: &str) -> Result<Vec<Lease>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().context("dumpleases printed nothing")?;
    ensure!(
        header.starts_with("Mac Address"),
        "not dumpleases output (header {header:?})"
    );
    let mut leases = Vec::new();
    for line in lines {
        let mut words = line.split_whitespace();
        let (Some(mac), Some(ip)) = (words.next(), words.next()) else {
            bail!("dumpleases line {line:?} has no MAC and address");
        };
        let octets = mac.split(':').collect::<Vec<_>>();
        ensure!(
            octets.len() == 6
                && octets
                    .iter()
                    .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit())),
            "dumpleases line {line:?}: {mac:?} is not a MAC"
        );
        let ip: Ipv4Addr = ip
            .parse()
            .with_context(|| format!("dumpleases line {line:?}: bad address"))?;
        leases.push(Lease {
            mac: mac.to_ascii_lowercase(),
            ip,
        });
    }
    Ok(leases)
}

/// Checks the guest's lease: `guest_ip` (its `BULKHEAD-NET-DHCP=` marker) is an address from
/// the pool and the server's leases (`dumpleases` output) bind exactly that address to `mac`.
/// Returns the address.
pub fn check_lease(guest_ip: &str, dumpleases: &str, mac: &str) -> Result<Ipv4Addr> {
    let ip: Ipv4Addr = guest_ip
        .trim()
        .parse()
        .with_context(|| format!("the guest's DHCP address {guest_ip:?} is not an address"))?;
    ensure!(
        in_pool(ip),
        "the guest's address {ip} is not from the server's pool {POOL_START}-{POOL_END}"
    );
    let leases = parse_dumpleases(dumpleases)?;
    let mac = mac.to_ascii_lowercase();
    let mine: Vec<&Lease> = leases.iter().filter(|l| l.mac == mac).collect();
    ensure!(
        mine.len() == 1 && mine[0].ip == ip,
        "the server's leases do not bind {ip} to {mac}: {leases:?}"
    );
    Ok(ip)
}

/// What the kit's net modes print about their lease: `BULKHEAD-NET-DHCP=`,
/// `BULKHEAD-NET-ROUTER=` and `BULKHEAD-NET-ADDR=` (the address on eth0 with its prefix).
#[derive(Debug, Clone)]
pub struct GuestMarkers {
    pub dhcp: String,
    pub router: String,
    pub addr: String,
}

/// Checks the guest's side and the server's side of the lease: [`check_lease`], the router is
/// the far side's address, and eth0 carries the leased address with the pool's /24. Returns the
/// address.
pub fn check_guest(guest: &GuestMarkers, dumpleases: &str, mac: &str) -> Result<Ipv4Addr> {
    let ip = check_lease(&guest.dhcp, dumpleases, mac)?;
    ensure!(
        guest.router.trim() == NET_PEER_ADDR,
        "the guest's router is {:?}, the server hands out {NET_PEER_ADDR}",
        guest.router
    );
    ensure!(
        guest.addr.trim() == format!("{ip}/24"),
        "eth0 carries {:?}, want the lease {ip}/24",
        guest.addr
    );
    Ok(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "Mac Address       IP Address      Host Name           Expires in\n\
                        aa:27:2e:79:02:80 10.77.0.122                         00:09:59\n";

    #[test]
    fn parses_dumpleases() {
        let l = parse_dumpleases(DUMP).expect("parse");
        assert_eq!(
            l,
            [Lease {
                mac: "aa:27:2e:79:02:80".into(),
                ip: Ipv4Addr::new(10, 77, 0, 122)
            }]
        );
        assert!(parse_dumpleases("Mac Address  IP Address\n")
            .expect("empty")
            .is_empty());
        assert!(parse_dumpleases("").is_err());
        assert!(parse_dumpleases("something else\n").is_err());
        assert!(parse_dumpleases("Mac Address\nzz:27:2e:79:02:80 10.77.0.1\n").is_err());
        assert!(parse_dumpleases("Mac Address\naa:27:2e:79:02:80 10.77.0\n").is_err());
    }

    #[test]
    fn checks_the_lease() {
        assert!(check_lease("10.77.0.122", DUMP, "AA:27:2E:79:02:80").is_ok());
        // Another MAC, another address, an address outside the pool.
        assert!(check_lease("10.77.0.122", DUMP, "aa:27:2e:79:02:81").is_err());
        assert!(check_lease("10.77.0.123", DUMP, "aa:27:2e:79:02:80").is_err());
        let outside = DUMP.replace("10.77.0.122", "10.77.0.2 ");
        assert!(check_lease("10.77.0.2", &outside, "aa:27:2e:79:02:80").is_err());
        assert!(check_lease("", DUMP, "aa:27:2e:79:02:80").is_err());
    }

    #[test]
    fn checks_the_guest() {
        let mut g = GuestMarkers {
            dhcp: "10.77.0.122".into(),
            router: "10.77.0.1".into(),
            addr: "10.77.0.122/24".into(),
        };
        assert!(check_guest(&g, DUMP, "aa:27:2e:79:02:80").is_ok());
        g.addr = "10.77.0.122/8".into();
        assert!(check_guest(&g, DUMP, "aa:27:2e:79:02:80").is_err());
        g.addr = "10.77.0.122/24".into();
        g.router = String::new();
        assert!(check_guest(&g, DUMP, "aa:27:2e:79:02:80").is_err());
    }

    #[test]
    fn config_names_pool_router_and_files() {
        let c = udhcpd_conf("bhtap0", "/x/leases", "/x/pid");
        for want in [
            "interface bhtap0\n",
            "start 10.77.0.100\n",
            "end 10.77.0.149\n",
            "lease_file /x/leases\n",
            "pidfile /x/pid\n",
            "option router 10.77.0.1\n",
            "option subnet 255.255.255.0\n",
        ] {
            assert!(c.contains(want), "{want:?} missing in {c}");
        }
    }
}
