//! What the daemon runs with, computed from the cloud-config's `p2p:` block — a pure function.
//!
//! Kairos runs EdgeVPN with an environment file: `DHCP=true`,
//! `DHCPLEASEDIR=/usr/local/.kairos/lease`, `EDGEVPNDHT=false` when `p2p.disable_dht`, then
//! `p2p.vpn.env` on top (the user wins). The same names are honoured here, so a config written
//! for Go Kairos means the same; our typed keys (`p2p.vpn.address`, `mtu`, `interface`,
//! `p2p.bootstrap_peers`, …) win over the environment.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use kairos_config::types::P2p;
use kairos_mesh::Token;

/// Kairos' DHCP lease directory.
pub const LEASE_DIR: &str = "/usr/local/.kairos/lease";
/// Where the daemon keeps its identity (so a restarted node keeps its PeerID and address).
pub const STATE_DIR: &str = "/usr/local/.kairos/mesh";
/// The status socket `kairos-agent p2p status` reads.
pub const STATUS_SOCKET: &str = "/run/kairos/p2p.sock";
pub const DEFAULT_INTERFACE: &str = "edgevpn0";
pub const DEFAULT_ADDRESS: &str = "10.1.0.1/24";
pub const DEFAULT_MTU: u32 = 1200;
pub const DEFAULT_DOMAIN: &str = "mesh";
pub const DEFAULT_MAX_CONNECTIONS: u32 = 64;
/// EdgeVPN's forwarders when nothing else is known.
pub const DEFAULT_FORWARDERS: [&str; 2] = ["8.8.8.8:53", "1.1.1.1:53"];

/// The environment names of EdgeVPN's that `p2p.vpn.env` may set here.
pub const ENV_NAMES: &[&str] = &[
    "ADDRESS",
    "IFACE",
    "EDGEVPNMTU",
    "DHCP",
    "DHCPLEASEDIR",
    "DNSADDRESS",
    "DNSFORWARD",
    "DNSFORWARDSERVER",
    "EDGEVPNDHT",
    "EDGEVPNMDNS",
    "EDGEVPNLISTENMADDRS",
    "EDGEVPNLEDGERINTERVAL",
    "EDGEVPNLEDGERSYNCINTERVAL",
    "HEALTHCHECKINTERVAL",
    "HEALTHCHECKMAXINTERVAL",
];

/// How the VPN address is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addressing {
    /// A fixed address.
    Static(Ipv4Addr, u8),
    /// DHCP over the ledger, starting at `first`; the lease is kept in `lease_dir`.
    Dhcp {
        first: Ipv4Addr,
        prefix: u8,
        lease_dir: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpnSettings {
    pub interface: String,
    pub addressing: Addressing,
    pub mtu: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    pub listen: SocketAddr,
    pub domain: String,
    /// Upstream servers; `None`: those of /etc/resolv.conf at start (not ourselves), else
    /// EdgeVPN's defaults.
    pub forward: Option<Vec<SocketAddr>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intervals {
    /// `machines` is re-announced this often (EdgeVPN 10 s).
    pub announce: Duration,
    /// The whole ledger is re-sent this often (EdgeVPN 10 s).
    pub sync: Duration,
    /// Heartbeat into `healthcheck` (EdgeVPN 120 s).
    pub healthcheck: Duration,
    /// A node is alive while its heartbeat is younger than this (EdgeVPN 900 s).
    pub maxtime: Duration,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub token: Token,
    /// None: `p2p.vpn.create: false` (the mesh and ledger run, no device).
    pub vpn: Option<VpnSettings>,
    pub listen: Vec<String>,
    pub peers: Vec<String>,
    pub mdns: bool,
    /// Asked for (`p2p.disable_dht` false); kairos-rs has no DHT yet, so it is reported.
    pub dht: bool,
    pub dns: Option<DnsSettings>,
    pub max_connections: u32,
    pub network_id: String,
    pub intervals: Intervals,
}

/// Parses `a.b.c.d/n`.
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, prefix) = s.trim().split_once('/').unwrap_or((s.trim(), "24"));
    let ip: Ipv4Addr = ip.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    (prefix > 0 && prefix <= 30).then_some((ip, prefix))
}

fn env_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "t" | "true" | "yes" | "on" => Some(true),
        "0" | "f" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// An EdgeVPN duration: Go's `10s`/`2m` or a bare number of seconds.
fn env_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(n) = v.parse::<u64>() {
        return Some(Duration::from_secs(n));
    }
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        "h" => Some(Duration::from_secs(n * 3600)),
        _ => None,
    }
}

/// The daemon's settings for a `p2p:` block; errors name the key; warnings are what was
/// ignored. No token is an error (the daemon has nothing to join).
pub fn from_config(p: &P2p) -> Result<(Settings, Vec<String>), Vec<String>> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let token = match p.network_token.as_deref().map(str::trim) {
        None | Some("") => {
            errors.push("p2p.network_token is not set: make one with `kairos-agent p2p generate-token` and put it in the config".to_string());
            None
        }
        Some(t) => match Token::parse(t) {
            Ok(t) => Some(t),
            Err(e) => {
                errors.push(format!("p2p.network_token: {e}"));
                None
            }
        },
    };
    let vpn_cfg = p.vpn.clone().unwrap_or_default();
    let env = |k: &str| vpn_cfg.env.get(k).map(|t| t.0.clone());
    for k in vpn_cfg.env.keys() {
        if !ENV_NAMES.contains(&k.as_str()) {
            warnings.push(format!(
                "p2p.vpn.env.{k}: not used by this mesh (known: {})",
                ENV_NAMES.join(", ")
            ));
        }
    }
    let mut bad = |key: &str, v: &str, want: &str| {
        errors.push(format!("{key}: {v:?} is not {want}"));
    };

    let interface = vpn_cfg
        .interface
        .clone()
        .or_else(|| env("IFACE"))
        .unwrap_or_else(|| DEFAULT_INTERFACE.into());
    if !kairos_sys::net::valid_ifname(&interface) {
        bad(
            "p2p.vpn.interface",
            &interface,
            "an interface name (1–15 characters of A-Z a-z 0-9 _ . -)",
        );
    }
    let mtu = match (vpn_cfg.mtu, env("EDGEVPNMTU")) {
        (Some(m), _) => m,
        (None, Some(v)) => v.trim().parse().unwrap_or_else(|_| {
            bad("p2p.vpn.env.EDGEVPNMTU", &v, "a number");
            DEFAULT_MTU
        }),
        (None, None) => DEFAULT_MTU,
    };
    if !(576..=65535).contains(&mtu) {
        bad("p2p.vpn.mtu", &mtu.to_string(), "an MTU from 576 to 65535");
    }
    let addressing = if let Some(a) = &vpn_cfg.address {
        match parse_cidr(a) {
            Some((ip, prefix)) => Addressing::Static(ip, prefix),
            None => {
                bad(
                    "p2p.vpn.address",
                    a,
                    "an IPv4 address with a prefix of /1 to /30, like 10.1.0.5/24",
                );
                Addressing::Static(Ipv4Addr::UNSPECIFIED, 24)
            }
        }
    } else {
        let addr = env("ADDRESS").unwrap_or_else(|| DEFAULT_ADDRESS.into());
        let (ip, prefix) = parse_cidr(&addr).unwrap_or_else(|| {
            bad(
                "p2p.vpn.env.ADDRESS",
                &addr,
                "an IPv4 address like 10.1.0.1/24",
            );
            (Ipv4Addr::new(10, 1, 0, 1), 24)
        });
        // Kairos runs EdgeVPN with DHCP=true unless the user says otherwise.
        let dhcp = match env("DHCP") {
            None => true,
            Some(v) => env_bool(&v).unwrap_or_else(|| {
                bad("p2p.vpn.env.DHCP", &v, "true or false");
                true
            }),
        };
        if dhcp {
            Addressing::Dhcp {
                first: ip,
                prefix,
                lease_dir: env("DHCPLEASEDIR")
                    .unwrap_or_else(|| LEASE_DIR.into())
                    .into(),
            }
        } else {
            Addressing::Static(ip, prefix)
        }
    };
    let create = vpn_cfg.create.is_none_or(|b| b.0);
    let vpn = create.then_some(VpnSettings {
        interface,
        addressing,
        mtu,
    });

    let flag = |name: &str, default: bool, errors: &mut Vec<String>| match env(name) {
        None => default,
        Some(v) => env_bool(&v).unwrap_or_else(|| {
            errors.push(format!("p2p.vpn.env.{name}: {v:?} is not true or false"));
            default
        }),
    };
    let mdns = match &p.mdns {
        Some(b) => b.0,
        None => flag("EDGEVPNMDNS", true, &mut errors),
    };
    let dht = flag("EDGEVPNDHT", !p.disable_dht.0, &mut errors);
    if dht {
        warnings.push("p2p: this mesh does not use the public DHT; peers are found by mDNS on the LAN and p2p.bootstrap_peers, then by the network's own DHT (set p2p.disable_dht: true to silence this)".into());
    }

    let mut listen: Vec<String> = p.listen_addresses.clone();
    if listen.is_empty() {
        listen = env("EDGEVPNLISTENMADDRS")
            .map(|v| {
                v.split([',', ' '])
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_else(|| vec!["/ip4/0.0.0.0/tcp/0".into()]);
    }
    for (i, a) in listen.iter().enumerate() {
        if a.parse::<libp2p::Multiaddr>().is_err() {
            errors.push(format!(
                "p2p.listen_addresses[{i}]: {a:?} is not a multiaddr like /ip4/0.0.0.0/tcp/4001"
            ));
        }
    }
    for (i, a) in p.bootstrap_peers.iter().enumerate() {
        let ok = a.parse::<libp2p::Multiaddr>().is_ok_and(|m| {
            m.iter()
                .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        });
        if !ok {
            errors.push(format!("p2p.bootstrap_peers[{i}]: {a:?} is not a multiaddr with a peer id, like /ip4/192.0.2.1/tcp/4001/p2p/12D3KooW…"));
        }
    }

    let domain = p
        .dns_domain
        .clone()
        .unwrap_or_else(|| DEFAULT_DOMAIN.into())
        .trim_matches('.')
        .to_ascii_lowercase();
    if kairos_config::names::hostname(&domain).is_err() {
        errors.push(format!(
            "p2p.dns_domain: {domain:?} is not a DNS name (labels of letters, digits and -)"
        ));
    }
    let dns_addr = env("DNSADDRESS").or_else(|| p.dns.0.then(|| "127.0.0.1:53".to_string()));
    let dns = match dns_addr {
        None => None,
        Some(a) => match a.parse::<SocketAddr>() {
            Ok(listen) => {
                let forward = if !flag("DNSFORWARD", true, &mut errors) {
                    Some(Vec::new())
                } else {
                    env("DNSFORWARDSERVER").map(|v| {
                        v.split(',')
                            .filter_map(|s| {
                                let s = s.trim();
                                s.parse().ok().or_else(|| {
                                    errors.push(format!(
                                        "p2p.vpn.env.DNSFORWARDSERVER: {s:?} is not an address:port"
                                    ));
                                    None
                                })
                            })
                            .collect()
                    })
                };
                Some(DnsSettings {
                    listen,
                    domain: domain.clone(),
                    forward,
                })
            }
            Err(_) => {
                errors.push(format!(
                    "p2p.vpn.env.DNSADDRESS: {a:?} is not an address:port like 127.0.0.1:53"
                ));
                None
            }
        },
    };

    let mut dur = |name: &str, default: u64| match env(name) {
        None => Duration::from_secs(default),
        Some(v) => env_duration(&v)
            .filter(|d| !d.is_zero())
            .unwrap_or_else(|| {
                errors.push(format!(
                    "p2p.vpn.env.{name}: {v:?} is not a duration like 10s"
                ));
                Duration::from_secs(default)
            }),
    };
    let intervals = Intervals {
        announce: dur("EDGEVPNLEDGERINTERVAL", 10),
        sync: dur("EDGEVPNLEDGERSYNCINTERVAL", 10),
        healthcheck: dur("HEALTHCHECKINTERVAL", 120),
        maxtime: dur("HEALTHCHECKMAXINTERVAL", 900),
    };

    match token {
        Some(token) if errors.is_empty() => Ok((
            Settings {
                token,
                vpn,
                listen,
                peers: p.bootstrap_peers.clone(),
                mdns,
                dht,
                dns,
                max_connections: p.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS).max(1),
                network_id: p.network_id.clone().unwrap_or_else(|| "kairos".into()),
                intervals,
            },
            warnings,
        )),
        _ => Err(errors),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p2p(yaml: &str) -> P2p {
        let v = kairos_config::yaml::parse(yaml, &std::sync::Arc::from("test"))
            .unwrap()
            .to_json();
        serde_json::from_value(v).unwrap()
    }

    fn tok() -> String {
        Token::generate(9000).encode()
    }

    #[test]
    fn kairos_defaults() {
        let (s, w) = from_config(&p2p(&format!("network_token: {}\n", tok()))).unwrap();
        let v = s.vpn.unwrap();
        assert_eq!(v.interface, "edgevpn0");
        assert_eq!(v.mtu, 1200);
        assert_eq!(
            v.addressing,
            Addressing::Dhcp {
                first: Ipv4Addr::new(10, 1, 0, 1),
                prefix: 24,
                lease_dir: LEASE_DIR.into()
            }
        );
        assert!(s.mdns && s.dht && s.dns.is_none());
        assert_eq!(s.network_id, "kairos");
        assert_eq!(s.intervals.announce, Duration::from_secs(10));
        assert!(w.iter().any(|w| w.contains("public DHT")), "{w:?}");
    }

    #[test]
    fn edgevpn_environment_then_typed_keys() {
        let c = format!(
            "network_token: {}\ndisable_dht: true\ndns: true\nvpn:\n  env:\n    ADDRESS: 10.5.0.9/16\n    DHCP: \"false\"\n    IFACE: mesh0\n    EDGEVPNMTU: \"1300\"\n    HEALTHCHECKINTERVAL: 5s\n    FOO: bar\n",
            tok()
        );
        let (s, w) = from_config(&p2p(&c)).unwrap();
        let v = s.vpn.clone().unwrap();
        assert_eq!(
            v.addressing,
            Addressing::Static(Ipv4Addr::new(10, 5, 0, 9), 16)
        );
        assert_eq!((v.interface.as_str(), v.mtu), ("mesh0", 1300));
        assert_eq!(s.intervals.healthcheck, Duration::from_secs(5));
        assert!(!s.dht);
        let d = s.dns.unwrap();
        assert_eq!(d.listen, "127.0.0.1:53".parse().unwrap());
        assert_eq!((d.domain.as_str(), d.forward), ("mesh", None));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("p2p.vpn.env.FOO"));
        // Typed keys win.
        let c2 = c.replace(
            "vpn:\n",
            "vpn:\n  address: 10.9.0.1/24\n  mtu: 1400\n  interface: wg7\n",
        );
        let v = from_config(&p2p(&c2)).unwrap().0.vpn.unwrap();
        assert_eq!(
            v.addressing,
            Addressing::Static(Ipv4Addr::new(10, 9, 0, 1), 24)
        );
        assert_eq!((v.interface.as_str(), v.mtu), ("wg7", 1400));
    }

    #[test]
    fn errors_name_the_key() {
        let e = from_config(&p2p("dns: true\n")).unwrap_err();
        assert!(e[0].contains("p2p.network_token is not set"), "{e:?}");
        let e = from_config(&p2p("network_token: bm90IGEgdG9rZW4=\n")).unwrap_err();
        assert!(e[0].starts_with("p2p.network_token:"), "{e:?}");
        let c = format!(
            "network_token: {}\nbootstrap_peers: [/ip4/1.2.3.4/tcp/1]\nlisten_addresses: [nonsense]\ndns_domain: \"bad domain\"\nvpn:\n  address: 10.1.0.1/31\n  interface: a/b\n  mtu: 9\n  env:\n    DHCP: maybe\n",
            tok()
        );
        let e = from_config(&p2p(&c)).unwrap_err();
        for key in [
            "p2p.vpn.interface",
            "p2p.vpn.mtu",
            "p2p.vpn.address",
            "p2p.bootstrap_peers[0]",
            "p2p.listen_addresses[0]",
            "p2p.dns_domain",
        ] {
            assert!(e.iter().any(|m| m.starts_with(key)), "{key} in {e:?}");
        }
    }

    #[test]
    fn no_device_when_vpn_create_is_false() {
        let c = format!("network_token: {}\nvpn: {{create: false}}\n", tok());
        assert!(from_config(&p2p(&c)).unwrap().0.vpn.is_none());
    }

    #[test]
    fn durations() {
        assert_eq!(env_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(env_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(env_duration("15"), Some(Duration::from_secs(15)));
        assert_eq!(env_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(env_duration("1x"), None);
        assert_eq!(env_duration("s"), None);
    }
}
