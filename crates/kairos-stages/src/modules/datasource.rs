//! `datasource`: user-data and metadata from the machine's provider — an attached
//! `cidata`/`config-2` medium, a file, or a cloud's metadata service — written where the next
//! config collection reads it (`<path>/userdata` and, when it is a config, `<path>/<name>`).
//!
//! As yip: media are probed first, in the order listed, then the network providers all at
//! once (the first listed that answers wins); the hostname and SSH keys of the metadata are
//! written under `/run/config` and applied; user-data that starts with `#!` is run as a
//! script; a MIME multipart user-data (VMware) gives its `text/cloud-config` part. Nothing
//! found is an error that names what each provider said.
//!
//! Every metadata URL starts at the provider's documented address; `KAIROS_DATASOURCE_URL`
//! (for tests only) replaces scheme and host of all of them, so a loopback stand-in server
//! can play every provider.

use std::path::Path;
use std::time::Duration;

use kairos_config::types::Datasource;

use crate::executor::Ctx;

/// The most user-data or metadata read from any source.
const MAX_DATA: u64 = 16 * 1024 * 1024;

/// The providers yip knows, media first.
pub const PROVIDERS: &[&str] = &[
    "cdrom",
    "config-drive",
    "file",
    "aws",
    "azure",
    "gcp",
    "hetzner",
    "openstack",
    "packet",
    "scaleway",
    "vultr",
    "digitalocean",
    "metaldata",
    "vmware",
];

/// What a provider gave.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Found {
    pub userdata: Option<Vec<u8>>,
    pub hostname: Option<String>,
    pub keys: Vec<String>,
}

impl Found {
    fn is_empty(&self) -> bool {
        self.userdata.as_ref().is_none_or(|u| u.is_empty())
            && self.hostname.is_none()
            && self.keys.is_empty()
    }
}

type Probe = Result<Found, String>;

fn base(default: &str) -> String {
    std::env::var("KAIROS_DATASOURCE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .map(|u| u.trim_end_matches('/').to_string())
        .unwrap_or_else(|| default.to_string())
}

/// One HTTP request to a metadata service: `Ok(None)` for 404 (nothing there).
fn http(method: &str, url: &str, headers: &[(&str, &str)]) -> Result<Option<Vec<u8>>, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(2)))
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let resp = match method {
        "PUT" => {
            let mut r = agent.put(url);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.send_empty()
        }
        _ => {
            let mut r = agent.get(url);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.call()
        }
    };
    let mut resp = resp.map_err(|e| format!("{url}: {e}"))?;
    match resp.status().as_u16() {
        200 => resp
            .body_mut()
            .with_config()
            .limit(MAX_DATA)
            .read_to_vec()
            .map(Some)
            .map_err(|e| format!("{url}: {e}")),
        404 => Ok(None),
        s => Err(format!("{url}: HTTP {s}")),
    }
}

fn text(b: Option<Vec<u8>>) -> Option<String> {
    b.map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn lines(b: Option<Vec<u8>>) -> Vec<String> {
    text(b)
        .map(|t| {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// EC2 (IMDSv2 token first, IMDSv1 if the service gives none).
fn aws() -> Probe {
    let b = base("http://169.254.169.254");
    let token = http(
        "PUT",
        &format!("{b}/latest/api/token"),
        &[("X-aws-ec2-metadata-token-ttl-seconds", "300")],
    )
    .ok()
    .flatten()
    .map(|t| String::from_utf8_lossy(&t).trim().to_string());
    let h: Vec<(&str, &str)> = token
        .as_deref()
        .map(|t| vec![("X-aws-ec2-metadata-token", t)])
        .unwrap_or_default();
    Ok(Found {
        userdata: http("GET", &format!("{b}/latest/user-data"), &h)?,
        hostname: text(
            http("GET", &format!("{b}/latest/meta-data/hostname"), &h)
                .ok()
                .flatten(),
        ),
        keys: lines(
            http(
                "GET",
                &format!("{b}/latest/meta-data/public-keys/0/openssh-key"),
                &h,
            )
            .ok()
            .flatten(),
        ),
    })
}

fn gcp() -> Probe {
    let b = base("http://metadata.google.internal");
    let h = [("Metadata-Flavor", "Google")];
    let m = format!("{b}/computeMetadata/v1/instance");
    // `ssh-keys` lines are `user:key`.
    let keys = lines(
        http("GET", &format!("{m}/attributes/ssh-keys"), &h)
            .ok()
            .flatten(),
    )
    .into_iter()
    .map(|l| l.split_once(':').map(|(_, k)| k.to_string()).unwrap_or(l))
    .collect();
    Ok(Found {
        userdata: http("GET", &format!("{m}/attributes/user-data"), &h)?,
        hostname: text(http("GET", &format!("{m}/hostname"), &h).ok().flatten()),
        keys,
    })
}

fn azure() -> Probe {
    use base64::Engine;
    let b = base("http://169.254.169.254");
    let h = [("Metadata", "true")];
    let q = "api-version=2021-01-01&format=text";
    let userdata = http(
        "GET",
        &format!("{b}/metadata/instance/compute/userData?{q}"),
        &h,
    )?
    .map(|raw| {
        base64::engine::general_purpose::STANDARD
            .decode(String::from_utf8_lossy(&raw).trim())
            .map_err(|e| format!("azure userData is not base64: {e}"))
    })
    .transpose()?;
    Ok(Found {
        userdata,
        hostname: text(
            http(
                "GET",
                &format!("{b}/metadata/instance/compute/name?{q}"),
                &h,
            )
            .ok()
            .flatten(),
        ),
        keys: Vec::new(),
    })
}

/// Providers whose user-data and hostname are plain GETs: (userdata, hostname, keys) paths.
fn simple(default: &str, userdata: &str, hostname: &str, keys: Option<&str>) -> Probe {
    let b = base(default);
    Ok(Found {
        userdata: http("GET", &format!("{b}{userdata}"), &[])?,
        hostname: text(http("GET", &format!("{b}{hostname}"), &[]).ok().flatten()),
        keys: keys
            .map(|k| lines(http("GET", &format!("{b}{k}"), &[]).ok().flatten()))
            .unwrap_or_default(),
    })
}

/// OpenStack's `meta_data.json`: `hostname` (or `name`) and `public_keys`.
fn from_meta_json(j: &serde_json::Value) -> (Option<String>, Vec<String>) {
    let hostname = j
        .get("hostname")
        .or_else(|| j.get("name"))
        .and_then(|h| h.as_str())
        .map(str::to_string);
    let keys = j
        .get("public_keys")
        .and_then(|k| k.as_object())
        .map(|m| {
            m.values()
                .filter_map(|v| v.as_str().map(|s| s.trim().to_string()))
                .collect()
        })
        .unwrap_or_default();
    (hostname, keys)
}

fn openstack() -> Probe {
    let b = base("http://169.254.169.254");
    let meta = http("GET", &format!("{b}/openstack/latest/meta_data.json"), &[])
        .ok()
        .flatten()
        .and_then(|m| serde_json::from_slice::<serde_json::Value>(&m).ok());
    let (hostname, keys) = meta.as_ref().map(from_meta_json).unwrap_or_default();
    Ok(Found {
        userdata: http("GET", &format!("{b}/openstack/latest/user_data"), &[])?,
        hostname,
        keys,
    })
}

fn packet() -> Probe {
    let b = base("http://metadata.platformequinix.com");
    let meta = http("GET", &format!("{b}/metadata"), &[])
        .ok()
        .flatten()
        .and_then(|m| serde_json::from_slice::<serde_json::Value>(&m).ok());
    let hostname = meta
        .as_ref()
        .and_then(|m| m.get("hostname")?.as_str().map(str::to_string));
    let keys = meta
        .as_ref()
        .and_then(|m| m.get("ssh_keys")?.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect();
    Ok(Found {
        userdata: http("GET", &format!("{b}/userdata"), &[])?,
        hostname,
        keys,
    })
}

/// VMware guestinfo, through `vmware-rpctool` (open-vm-tools).
fn vmware() -> Probe {
    let get = |key: &str| -> Result<Option<String>, String> {
        let out = kairos_sys::exec::Cmd::new("vmware-rpctool")
            .arg(format!("info-get {key}"))
            .run_status()
            .map_err(|e| format!("vmware: {e} (open-vm-tools)"))?;
        Ok((out.status == 0)
            .then(|| out.stdout_text().trim_end_matches('\n').to_string())
            .filter(|s| !s.is_empty()))
    };
    let Some(raw) = get("guestinfo.userdata")? else {
        return Ok(Found::default());
    };
    let enc = get("guestinfo.userdata.encoding")?.unwrap_or_default();
    let data = crate::modules::files::decode(&raw, Some(enc.as_str()).filter(|e| !e.is_empty()))?;
    Ok(Found {
        userdata: Some(data),
        ..Default::default()
    })
}

/// Reads files from a medium labelled `labels`, mounted read-only for the time of it.
fn medium(labels: &[&str], files: &[&str], meta: Option<&str>) -> Probe {
    let devs: Vec<(std::path::PathBuf, kairos_sys::blockdev::Probed)> =
        kairos_sys::blockdev::devices()
            .into_iter()
            .filter_map(|d| kairos_sys::blockdev::probe(&d).map(|p| (d, p)))
            .filter(|(_, p)| p.label.as_deref().is_some_and(|l| labels.contains(&l)))
            .collect();
    let Some((dev, probed)) = devs.into_iter().next() else {
        return Err(format!("no device labelled {}", labels.join(" or ")));
    };
    let fstype = probed.fstype;
    // ISO 9660 is read in userspace (no isofs module needed, nothing mounted); a vfat
    // config drive is mounted read-only for the time of it.
    let mut mounted: Option<std::path::PathBuf> = None;
    if fstype != "iso9660" {
        let _ = kairos_sys::kmod::ensure(&[fstype]);
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let mnt = std::env::temp_dir().join(format!(
            "kairos-datasource-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&mnt).map_err(|e| format!("{}: {e}", mnt.display()))?;
        let (src, target) = (dev.to_string_lossy(), mnt.to_string_lossy());
        use kairos_sys::mount::MountFlags;
        let flags =
            MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        if let Err(e) = kairos_sys::mount::mount(&src, &target, fstype, flags, "") {
            let _ = std::fs::remove_dir(&mnt);
            return Err(format!("mounting {src} ({fstype}): {e}"));
        }
        mounted = Some(mnt);
    }
    let read = |rel: &str| -> Option<Vec<u8>> {
        match &mounted {
            None => kairos_sys::iso9660::read_file(&dev, rel, MAX_DATA)
                .ok()
                .flatten(),
            Some(mnt) => kairos_sys::beneath::Dir::open(mnt)
                .ok()?
                .read_limited(Path::new(rel), MAX_DATA)
                .ok(),
        }
    };
    let mut found = Found {
        userdata: files.iter().find_map(|f| read(f)),
        ..Default::default()
    };
    if let Some(m) = meta.and_then(read) {
        if let Ok(j) = serde_json::from_slice::<serde_json::Value>(&m) {
            (found.hostname, found.keys) = from_meta_json(&j);
        } else {
            // NoCloud `meta-data`: YAML `local-hostname: x`.
            found.hostname = String::from_utf8_lossy(&m).lines().find_map(|l| {
                l.strip_prefix("local-hostname:")
                    .map(|h| h.trim().trim_matches(['"', '\'']).to_string())
            });
        }
    }
    if let Some(mnt) = mounted {
        let _ = kairos_sys::mount::unmount(&mnt.to_string_lossy(), true);
        let _ = std::fs::remove_dir(&mnt);
    }
    Ok(found)
}

/// Media and files (probed in the order listed, on this thread).
fn probe_local(ctx: &Ctx, provider: &str, d: &Datasource) -> Probe {
    match provider {
        "cdrom" => medium(
            &["cidata", "CIDATA"],
            &["user-data", "user_data"],
            Some("meta-data"),
        ),
        "config-drive" => medium(
            &["config-2", "CONFIG-2"],
            &["openstack/latest/user_data"],
            Some("openstack/latest/meta_data.json"),
        ),
        "file" => {
            let p = d
                .path
                .as_deref()
                .filter(|p| !p.is_empty())
                .ok_or("the file provider needs `path`, the file to read")?;
            ctx.root
                .dir()
                .and_then(|dir| dir.read_limited(Path::new(p.trim_start_matches('/')), MAX_DATA))
                .map(|b| Found {
                    userdata: Some(b),
                    ..Default::default()
                })
                .map_err(|e| format!("{p}: {e}"))
        }
        other => probe_net(other),
    }
}

/// Metadata services (probed all at once).
fn probe_net(provider: &str) -> Probe {
    match provider {
        "aws" => aws(),
        "gcp" => gcp(),
        "azure" => azure(),
        "hetzner" => simple(
            "http://169.254.169.254",
            "/hetzner/v1/userdata",
            "/hetzner/v1/metadata/hostname",
            Some("/hetzner/v1/metadata/public-keys"),
        ),
        "openstack" => openstack(),
        "packet" => packet(),
        "scaleway" => simple(
            "http://169.254.42.42",
            "/user_data/cloud-init",
            "/conf?format=text",
            None,
        ),
        "vultr" => simple(
            "http://169.254.169.254",
            "/latest/user-data",
            "/latest/meta-data/hostname",
            Some("/latest/meta-data/public-keys"),
        ),
        "digitalocean" => simple(
            "http://169.254.169.254",
            "/metadata/v1/user-data",
            "/metadata/v1/hostname",
            Some("/metadata/v1/public-keys"),
        ),
        "metaldata" => simple("http://metaldata", "/userdata", "/hostname", None),
        "vmware" => vmware(),
        other => Err(format!(
            "unknown provider `{other}` (known: {})",
            PROVIDERS.join(", ")
        )),
    }
}

/// The `text/cloud-config` part of a MIME multipart document, or the document itself.
pub fn unwrap_multipart(data: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(data);
    let Some(boundary) = text
        .lines()
        .take(20)
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("content-type: multipart/")
        })
        .and_then(|l| l.split("boundary=").nth(1))
        .map(|b| b.trim().trim_matches('"').to_string())
    else {
        return data.to_vec();
    };
    let sep = format!("--{boundary}");
    for part in text.split(&sep).skip(1) {
        let part = part.trim_start_matches(['\r', '\n']);
        let (head, body) = part
            .split_once("\r\n\r\n")
            .or_else(|| part.split_once("\n\n"))
            .unwrap_or(("", part));
        if head
            .to_ascii_lowercase()
            .contains("content-type: text/cloud-config")
        {
            let body = body.trim_end_matches(['\r', '\n']).trim_end_matches("--");
            return body.trim_end().as_bytes().to_vec();
        }
    }
    data.to_vec()
}

fn is_config(data: &[u8]) -> bool {
    let t = String::from_utf8_lossy(data);
    crate::loader::is_cloud_config(&t)
        || kairos_config::collect::has_header(&t)
        || kairos_config::yaml::parse(&t, &"userdata".into())
            .ok()
            .is_some_and(|n| n.get("stages").is_some())
}

pub fn datasource(ctx: &Ctx, d: &Datasource) -> Result<(), String> {
    if d.providers.is_empty() {
        return Err(format!(
            "no `providers` listed (known: {})",
            PROVIDERS.join(", ")
        ));
    }
    let name = match d.userdata_name.as_deref().filter(|n| !n.is_empty()) {
        None => "userdata.yaml",
        Some(n) if n.contains('/') || n == "." || n == ".." => {
            return Err(format!(
                "userdata_name {n:?} must be a file name (no `/`, not `.` or `..`): the user-data is written into `path`"
            ));
        }
        Some(n) => n,
    };
    let media: Vec<&String> = d
        .providers
        .iter()
        .filter(|p| matches!(p.as_str(), "cdrom" | "config-drive" | "file"))
        .collect();
    let mut tried: Vec<String> = Vec::new();
    let mut found: Option<(String, Found)> = None;
    for p in media {
        match probe_local(ctx, p, d) {
            Ok(f) if !f.is_empty() => {
                found = Some((p.clone(), f));
                break;
            }
            Ok(_) => tried.push(format!("{p}: nothing there")),
            Err(e) => tried.push(format!("{p}: {e}")),
        }
    }
    if found.is_none() {
        let net: Vec<&String> = d
            .providers
            .iter()
            .filter(|p| !matches!(p.as_str(), "cdrom" | "config-drive" | "file"))
            .collect();
        let results: Vec<(String, Probe)> = std::thread::scope(|s| {
            let handles: Vec<_> = net
                .iter()
                .map(|p| {
                    let p = p.as_str();
                    (p, s.spawn(move || probe_net(p)))
                })
                .collect();
            handles
                .into_iter()
                .map(|(p, h)| {
                    (
                        p.to_string(),
                        h.join().unwrap_or_else(|_| Err("probe panicked".into())),
                    )
                })
                .collect()
        });
        for (p, r) in results {
            match r {
                Ok(f) if !f.is_empty() && found.is_none() => found = Some((p, f)),
                Ok(f) if f.is_empty() => tried.push(format!("{p}: nothing there")),
                Ok(_) => {}
                Err(e) => tried.push(format!("{p}: {e}")),
            }
        }
    }
    let Some((provider, f)) = found else {
        return Err(format!("no metadata/userdata found ({})", tried.join("; ")));
    };
    let dir = d
        .path
        .as_deref()
        .filter(|p| !p.is_empty() && provider != "file")
        .unwrap_or("/run/config")
        .trim_end_matches('/')
        .to_string();
    let mut errs = Vec::new();
    if let Some(h) = &f.hostname {
        let r = super::system::write(ctx, "/run/config/hostname", &format!("{h}\n"), 0o644)
            .and_then(|_| super::system::hostname(ctx, h));
        errs.extend(r.err());
    }
    if !f.keys.is_empty() {
        let r = super::system::write(
            ctx,
            "/run/config/ssh/authorized_keys",
            &(f.keys.join("\n") + "\n"),
            0o600,
        )
        .and_then(|_| super::users::authorized_keys(ctx, "root", &f.keys));
        errs.extend(r.err());
    }
    if let Some(data) = f.userdata.filter(|u| !u.is_empty()) {
        let data = unwrap_multipart(&data);
        let raw = format!("{dir}/userdata");
        ctx.root
            .create_dir_all(&dir, 0o755)
            .map_err(|e| format!("creating {dir}: {e}"))?;
        ctx.root
            .write_file(&raw, &data, 0o644)
            .map_err(|e| format!("writing {raw}: {e}"))?;
        if data.starts_with(b"#!") {
            ctx.root
                .set_mode(&raw, 0o755)
                .map_err(|e| format!("{raw}: {e}"))?;
            if let Err(e) = ctx.shell.run(&raw) {
                errs.push(format!("user-data script from {provider}: {e}"));
            }
        } else if is_config(&data) {
            let p = format!("{dir}/{name}");
            ctx.root
                .write_file(&p, &data, 0o644)
                .map_err(|e| format!("writing {p}: {e}"))?;
        }
    }
    super::join(errs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_gives_the_cloud_config_part() {
        let m = "Content-Type: multipart/mixed; boundary=\"XX\"\nMIME-Version: 1.0\n\n--XX\nContent-Type: text/x-shellscript\n\n#!/bin/sh\necho hi\n--XX\nContent-Type: text/cloud-config\n\n#cloud-config\nhostname: h\n--XX--\n";
        assert_eq!(
            unwrap_multipart(m.as_bytes()),
            b"#cloud-config\nhostname: h"
        );
        assert_eq!(unwrap_multipart(b"#cloud-config\n"), b"#cloud-config\n");
    }

    #[test]
    fn openstack_metadata() {
        let j = serde_json::json!({"hostname": "n1", "public_keys": {"k": "ssh-ed25519 AAA"}});
        assert_eq!(
            from_meta_json(&j),
            (Some("n1".into()), vec!["ssh-ed25519 AAA".to_string()])
        );
    }
}
