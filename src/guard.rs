//! The outbound address guard: decides whether the gateway may connect to an address.
//!
//! Callers choose where the gateway sends requests, so the guard is checked twice: at ingest (to
//! reject a refused endpoint with a clear error) and again right before each connection. Endpoints
//! are IP literals, so there is no name resolution between the check and the connect.
//!
//! Always refused: unspecified, `0.0.0.0/8`, link-local (`169.254.0.0/16`, `fe80::/10`, which hold
//! cloud metadata services), multicast, broadcast and reserved `240.0.0.0/4`. Refused unless listed
//! in `outbound.allow_cidrs`: loopback, private, CGNAT, unique-local and other special-purpose
//! ranges. IPv4-mapped, IPv4-compatible and NAT64 IPv6 forms are judged as the IPv4 they carry.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Why an address was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Never reachable, whatever the configuration says.
    Forbidden(&'static str),
    /// Reachable only when allow-listed.
    NotAllowed(&'static str),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Forbidden(range) => write!(f, "{range} addresses are never allowed"),
            Refusal::NotAllowed(range) => write!(
                f,
                "{range} addresses are refused unless listed in outbound.allow_cidrs"
            ),
        }
    }
}

/// The configured guard.
#[derive(Debug, Clone, Default)]
pub struct AddressGuard {
    allow: Vec<IpNet>,
}

impl AddressGuard {
    pub fn new(allow: Vec<IpNet>) -> Self {
        Self { allow }
    }

    /// `Ok` when the gateway may connect to `ip`.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        let ip = canonical(ip);
        if let Some(range) = forbidden(ip) {
            return Err(Refusal::Forbidden(range));
        }
        match restricted(ip) {
            Some(range) if !self.allow.iter().any(|net| net.contains(&ip)) => {
                Err(Refusal::NotAllowed(range))
            }
            _ => Ok(()),
        }
    }
}

/// The address as the network will see it: IPv6 forms that carry an IPv4 address become it.
fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let s = v6.segments();
    let carries_v4 = |prefix: &[u16]| s[..6] == *prefix;
    if carries_v4(&[0, 0, 0, 0, 0, 0]) && (s[6] != 0 || s[7] > 1) {
        return IpAddr::V4(low_v4(v6)); // deprecated IPv4-compatible ::a.b.c.d
    }
    if carries_v4(&[0x64, 0xff9b, 0, 0, 0, 0]) {
        return IpAddr::V4(low_v4(v6)); // NAT64 well-known prefix
    }
    ip
}

fn low_v4(v6: Ipv6Addr) -> Ipv4Addr {
    let o = v6.octets();
    Ipv4Addr::new(o[12], o[13], o[14], o[15])
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u8) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let table: [([u8; 4], u8, &'static str); 5] = [
                ([0, 0, 0, 0], 8, "unspecified (0.0.0.0/8)"),
                ([169, 254, 0, 0], 16, "link-local (169.254.0.0/16)"),
                ([224, 0, 0, 0], 4, "multicast (224.0.0.0/4)"),
                ([240, 0, 0, 0], 4, "reserved or broadcast (240.0.0.0/4)"),
                ([255, 255, 255, 255], 32, "broadcast"),
            ];
            table
                .iter()
                .find(|(net, p, _)| in_v4(v4, *net, *p))
                .map(|t| t.2)
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if v6.is_unspecified() {
                Some("unspecified (::)")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local (fe80::/10)")
            } else if first & 0xff00 == 0xff00 {
                Some("multicast (ff00::/8)")
            } else {
                None
            }
        }
    }
}

fn restricted(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let table: [([u8; 4], u8, &'static str); 7] = [
                ([127, 0, 0, 0], 8, "loopback (127.0.0.0/8)"),
                ([10, 0, 0, 0], 8, "private (10.0.0.0/8)"),
                ([172, 16, 0, 0], 12, "private (172.16.0.0/12)"),
                ([192, 168, 0, 0], 16, "private (192.168.0.0/16)"),
                ([100, 64, 0, 0], 10, "shared CGNAT (100.64.0.0/10)"),
                (
                    [192, 0, 0, 0],
                    24,
                    "IETF protocol assignments (192.0.0.0/24)",
                ),
                ([198, 18, 0, 0], 15, "benchmarking (198.18.0.0/15)"),
            ];
            table
                .iter()
                .find(|(net, p, _)| in_v4(v4, *net, *p))
                .map(|t| t.2)
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback (::1)")
            } else if first & 0xfe00 == 0xfc00 {
                Some("unique-local (fc00::/7)")
            } else if first & 0xffc0 == 0xfec0 {
                Some("site-local (fec0::/10)")
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address should parse")
    }

    #[test]
    fn link_local_and_metadata_are_refused_even_when_allow_listed() {
        let guard = AddressGuard::new(vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]);
        for addr in [
            "169.254.169.254",
            "fe80::1",
            "::ffff:169.254.169.254",
            "0.0.0.1",
            "224.0.0.1",
        ] {
            assert!(
                matches!(guard.check(ip(addr)), Err(Refusal::Forbidden(_))),
                "{addr} should be forbidden whatever the allow-list says"
            );
        }
    }

    #[test]
    fn loopback_and_private_need_the_allow_list() {
        let closed = AddressGuard::default();
        for addr in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.1",
            "100.64.0.1",
            "::1",
            "fd00::1",
        ] {
            assert!(
                closed.check(ip(addr)).is_err(),
                "{addr} should be refused by default"
            );
        }
        let open = AddressGuard::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert_eq!(
            open.check(ip("127.0.0.1")),
            Ok(()),
            "allow-listed loopback should pass"
        );
        assert!(
            open.check(ip("10.0.0.1")).is_err(),
            "a range not listed stays refused"
        );
    }

    #[test]
    fn ipv6_forms_of_ipv4_are_judged_as_ipv4() {
        let guard = AddressGuard::default();
        for addr in [
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "::ffff:10.0.0.1",
        ] {
            assert!(
                guard.check(ip(addr)).is_err(),
                "{addr} should be refused like its IPv4"
            );
        }
    }

    #[test]
    fn public_addresses_pass() {
        let guard = AddressGuard::default();
        for addr in ["203.0.113.10", "8.8.8.8", "2001:db8::1"] {
            assert_eq!(guard.check(ip(addr)), Ok(()), "{addr} should be allowed");
        }
    }
}
