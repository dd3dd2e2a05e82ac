//! System information exposed to templates as `.Values` (the shape Kairos' sysinfo gives).

use std::collections::BTreeMap;
use std::fs;

use serde_json::{Map, Value, json};

use crate::root::Root;

/// Parses `KEY=value` files (os-release, /etc/environment, dotenv): comments skipped, an
/// `export ` prefix and one level of quotes removed.
pub fn parse_key_values(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("export ").unwrap_or(l);
            if l.starts_with('#') {
                return None;
            }
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

pub fn os_release(root: &Root) -> BTreeMap<String, String> {
    let text = fs::read_to_string(root.join("etc/os-release"))
        .or_else(|_| fs::read_to_string(root.join("usr/lib/os-release")))
        .unwrap_or_default();
    parse_key_values(&text)
}

/// The hostname of the target: the kernel's for the running system, `/etc/hostname` otherwise.
pub fn hostname(root: &Root) -> String {
    if root.is_host()
        && let Ok(u) = rustix::system::uname().nodename().to_str()
    {
        return u.to_string();
    }
    fs::read_to_string(root.join("etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn machine_id(root: &Root) -> String {
    fs::read_to_string(root.join("etc/machine-id"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Go's GOARCH spelling of this machine's architecture.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "riscv64" => "riscv64",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        other => other,
    }
}

/// The `.Values` document: `node`, `os`, `kernel`, `cpu`, `memory`, `product`, `board`, …
pub fn values(root: &Root) -> Value {
    let osr = os_release(root);
    let get = |k: &str| osr.get(k).cloned().unwrap_or_default();
    let uname = rustix::system::uname();
    let s = |c: &std::ffi::CStr| c.to_string_lossy().into_owned();
    let mut cpus = 0;
    let mut cpu_model = String::new();
    let mut cpu_vendor = String::new();
    for l in fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
    {
        if let Some((k, v)) = l.split_once(':') {
            match k.trim() {
                "processor" => cpus += 1,
                "model name" if cpu_model.is_empty() => cpu_model = v.trim().to_string(),
                "vendor_id" if cpu_vendor.is_empty() => cpu_vendor = v.trim().to_string(),
                _ => {}
            }
        }
    }
    let mem_mb = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or(0);
    let dmi = |f: &str| {
        fs::read_to_string(format!("/sys/class/dmi/id/{f}"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let mut network = Vec::new();
    if let Ok(rd) = fs::read_dir("/sys/class/net") {
        let mut names: Vec<_> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in names {
            let mac = fs::read_to_string(format!("/sys/class/net/{n}/address"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            network.push(json!({"name": n, "macaddress": mac}));
        }
    }
    let mut v = Map::new();
    v.insert(
        "node".into(),
        json!({"hostname": hostname(root), "machineid": machine_id(root), "timezone": ""}),
    );
    v.insert(
        "os".into(),
        json!({
            "name": get("PRETTY_NAME"), "vendor": get("ID"), "version": get("VERSION_ID"),
            "release": get("VERSION_ID"), "architecture": go_arch(),
        }),
    );
    v.insert(
        "kernel".into(),
        json!({"release": s(uname.release()), "version": s(uname.version()), "architecture": s(uname.machine())}),
    );
    v.insert(
        "product".into(),
        json!({"name": dmi("product_name"), "vendor": dmi("sys_vendor"), "version": dmi("product_version"), "serial": dmi("product_serial"), "uuid": dmi("product_uuid")}),
    );
    v.insert(
        "board".into(),
        json!({"name": dmi("board_name"), "vendor": dmi("board_vendor"), "version": dmi("board_version"), "serial": dmi("board_serial")}),
    );
    v.insert(
        "chassis".into(),
        json!({"type": dmi("chassis_type"), "vendor": dmi("chassis_vendor"), "version": dmi("chassis_version"), "serial": dmi("chassis_serial")}),
    );
    v.insert(
        "bios".into(),
        json!({"vendor": dmi("bios_vendor"), "version": dmi("bios_version"), "date": dmi("bios_date")}),
    );
    v.insert(
        "cpu".into(),
        json!({"vendor": cpu_vendor, "model": cpu_model, "cpus": cpus, "cores": cpus, "threads": cpus}),
    );
    v.insert("memory".into(), json!({"size": mem_mb}));
    v.insert("network".into(), Value::Array(network));
    Value::Object(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_quotes() {
        let m = parse_key_values("NAME=\"Debian GNU/Linux\"\nID=debian\n# c\nVERSION_ID='12'\n");
        assert_eq!(m["NAME"], "Debian GNU/Linux");
        assert_eq!(m["ID"], "debian");
        assert_eq!(m["VERSION_ID"], "12");
    }

    #[test]
    fn values_read_from_root() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("etc")).unwrap();
        fs::write(d.path().join("etc/hostname"), "node1\n").unwrap();
        fs::write(
            d.path().join("etc/os-release"),
            "PRETTY_NAME=\"Debian 12\"\nVERSION_ID=12\n",
        )
        .unwrap();
        let v = values(&Root::new(d.path()));
        assert_eq!(v["node"]["hostname"], "node1");
        assert_eq!(v["os"]["name"], "Debian 12");
    }
}
