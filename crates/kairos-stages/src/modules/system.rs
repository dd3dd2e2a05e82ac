//! `dns`, `hostname`, `sysctl`, `modules`, `timesyncd`, `environment`, `systemd_firstboot`.
//!
//! On the running system these act on the kernel; on an offline root they write the files
//! that make the same thing happen at its next boot.

use std::collections::BTreeMap;

use kairos_config::types::{Dns, Text};

use crate::executor::Ctx;

pub(super) fn write(ctx: &Ctx, path: &str, text: &str, mode: u32) -> Result<(), String> {
    write_with_parents(ctx, path, text, mode, 0o755)
}

fn write_with_parents(
    ctx: &Ctx,
    path: &str,
    text: &str,
    mode: u32,
    dir_mode: u32,
) -> Result<(), String> {
    ctx.root
        .create_parents(path, dir_mode)
        .map_err(|e| format!("creating the directories of {path}: {e}"))?;
    ctx.root
        .write_file(path, text.as_bytes(), mode)
        .map(|_| ())
        .map_err(|e| format!("writing {path}: {e}"))
}

pub fn dns(ctx: &Ctx, d: &Dns) -> Result<(), String> {
    if d.nameservers.is_empty() {
        return Ok(());
    }
    let mut out = String::new();
    if !d.search.is_empty() {
        out.push_str(&format!("search {}\n", d.search.join(" ")));
    }
    for ns in &d.nameservers {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    if !d.options.is_empty() {
        out.push_str(&format!("options {}\n", d.options.join(" ")));
    }
    let path = d
        .path
        .as_deref()
        .filter(|p| !p.is_empty())
        .unwrap_or("/etc/resolv.conf");
    write(ctx, path, &out, 0o644)
}

pub fn hostname(ctx: &Ctx, h: &str) -> Result<(), String> {
    let name = ctx.render(h).trim().to_string();
    if name.is_empty() {
        return Err("hostname is empty after templating".into());
    }
    kairos_config::names::hostname(&name)?;
    // The UTS namespace survives switch_root: set in the initramfs, it is the booted
    // system's hostname whatever its init does (busybox and OpenRC do not read /etc/hostname).
    if ctx.kernel() {
        kairos_sys::host::set_hostname(&name).map_err(|e| format!("sethostname {name}: {e}"))?;
    }
    write(ctx, "/etc/hostname", &format!("{name}\n"), 0o644)?;
    let hosts = ctx.root.read_to_string("etc/hosts").unwrap_or_default();
    let wanted = format!("127.0.0.1 localhost {name}");
    let mut found = false;
    let mut lines: Vec<String> = hosts
        .lines()
        .map(|l| {
            if l.split_whitespace().next() == Some("127.0.0.1") {
                found = true;
                wanted.clone()
            } else {
                l.to_string()
            }
        })
        .collect();
    if !found {
        lines.insert(0, wanted);
    }
    write(ctx, "/etc/hosts", &(lines.join("\n") + "\n"), 0o644)
}

/// `key = value` drop-in lines, merged with an existing file's keys, sorted.
fn merge_kv_file(
    ctx: &Ctx,
    path: &str,
    header: &str,
    sep: &str,
    kv: &BTreeMap<String, String>,
) -> Result<(), String> {
    let mut all: BTreeMap<String, String> = BTreeMap::new();
    if let Ok(t) = ctx.root.read_to_string(path) {
        for l in t.lines() {
            if let Some((k, v)) = l.split_once('=') {
                all.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
    }
    all.extend(kv.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut out = header.to_string();
    for (k, v) in &all {
        out.push_str(&format!("{k}{sep}{v}\n"));
    }
    write(ctx, path, &out, 0o644)
}

pub fn sysctl(ctx: &Ctx, kv: &BTreeMap<String, Text>) -> Result<(), String> {
    if ctx.kernel() {
        let mut errs = Vec::new();
        for (k, v) in kv {
            // A validated key is relative, with no `..`: it stays under /proc/sys.
            if let Err(e) = kairos_config::names::sysctl_key(k) {
                errs.push(e);
                continue;
            }
            let p = std::path::Path::new("/proc/sys").join(k.replace('.', "/"));
            if let Err(e) = std::fs::write(&p, &v.0) {
                errs.push(format!("{k}: writing {}: {e}", p.display()));
            }
        }
        return if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        };
    }
    for k in kv.keys() {
        kairos_config::names::sysctl_key(k)?;
    }
    let kv = kv.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect();
    merge_kv_file(ctx, "/etc/sysctl.d/90-kairos.conf", "", " = ", &kv)
}

pub fn kernel_modules(ctx: &Ctx, mods: &[String]) -> Result<(), String> {
    let mut errs = Vec::new();
    if ctx.root.is_host() {
        let loaded = kairos_sys::host::loaded_modules();
        for m in mods {
            let mut parts = m.split_whitespace();
            let Some(name) = parts.next() else { continue };
            if loaded.iter().any(|l| l == &name.replace('-', "_")) {
                continue;
            }
            let params: Vec<String> = parts.map(str::to_string).collect();
            if let Err(e) = kairos_sys::host::modprobe(name, &params) {
                errs.push(e.to_string());
            }
        }
        return if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        };
    }
    let load: Vec<String> = mods
        .iter()
        .filter_map(|m| m.split_whitespace().next().map(str::to_string))
        .collect();
    let options: Vec<String> = mods
        .iter()
        .filter(|m| m.split_whitespace().count() > 1)
        .map(|m| format!("options {m}"))
        .collect();
    write(
        ctx,
        "/etc/modules-load.d/90-kairos.conf",
        &(load.join("\n") + "\n"),
        0o644,
    )?;
    if !options.is_empty() {
        write(
            ctx,
            "/etc/modprobe.d/90-kairos.conf",
            &(options.join("\n") + "\n"),
            0o644,
        )?;
    }
    Ok(())
}

pub fn timesyncd(ctx: &Ctx, kv: &BTreeMap<String, Text>) -> Result<(), String> {
    let mut out = String::from("[Time]\n");
    for (k, v) in kv {
        out.push_str(&format!("{k} = {}\n", v.0));
    }
    write(
        ctx,
        "/etc/systemd/timesyncd.conf.d/10-yip.conf",
        &out,
        0o644,
    )
}

fn parse_dotenv(text: &str) -> BTreeMap<String, String> {
    kairos_sys::sysinfo::parse_key_values(text)
        .into_iter()
        .map(|(k, v)| (k, v.replace("\\\"", "\"")))
        .collect()
}

pub fn environment(
    ctx: &Ctx,
    kv: &BTreeMap<String, Text>,
    file: Option<&str>,
) -> Result<(), String> {
    let path = file.filter(|f| !f.is_empty()).unwrap_or("/etc/environment");
    let mut env = parse_dotenv(&ctx.root.read_to_string(path).unwrap_or_default());
    for (k, v) in kv {
        env.insert(k.clone(), ctx.render(&v.0));
    }
    let mut out = String::new();
    for (k, v) in &env {
        if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("{k}={v}\n"));
        } else {
            out.push_str(&format!("{k}=\"{}\"\n", v.replace('"', "\\\"")));
        }
    }
    write_with_parents(ctx, path, &out, 0o644, 0o744)
}

pub fn systemd_firstboot(ctx: &Ctx, kv: &BTreeMap<String, Text>) -> Result<(), String> {
    let mut args: Vec<String> = kv
        .iter()
        .map(|(k, v)| {
            if v.0 == "true" {
                format!("--{k}")
            } else {
                format!("--{k}={}", v.0)
            }
        })
        .collect();
    args.sort();
    if !ctx.root.is_host() {
        args.insert(0, format!("--root={}", ctx.root.path().display()));
    }
    kairos_sys::exec::run_program("systemd-firstboot", &args)
        .map(|_| ())
        .map_err(|e| format!("{e} (systemd-firstboot comes with systemd)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotenv_parse() {
        let m = parse_dotenv("A=1\nexport B=\"x y\"\n# c\nC='z'\n");
        assert_eq!(m["A"], "1");
        assert_eq!(m["B"], "x y");
        assert_eq!(m["C"], "z");
    }
}
