//! What to boot, decided from the kernel cmdline alone (pure, unit-tested).

/// Boot modes, with the marker file each writes under `/run/cos/` (Kairos' names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Active,
    Passive,
    Recovery,
    /// Booted from install media (ISO `COS_LIVE`): writable root in memory, nothing persists.
    Live,
}

impl Mode {
    pub fn marker(self) -> &'static str {
        match self {
            Mode::Active => "active_mode",
            Mode::Passive => "passive_mode",
            Mode::Recovery => "recovery_mode",
            Mode::Live => "live_mode",
        }
    }

    /// Where the store's filesystem is mounted (Kairos' paths: the agent reads the live
    /// medium's embedded config from /run/initramfs/live).
    pub fn store_mountpoint(self) -> &'static str {
        match self {
            Mode::Live => "/run/initramfs/live",
            _ => "/run/initramfs/cos-state",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub mode: Mode,
    /// Filesystem label of the partition holding the layer store.
    pub store_label: String,
    pub deployment: String,
    pub debug: bool,
    /// Hash every layer image before use (sizes are always checked).
    pub verify: bool,
    /// Seconds to wait for the store's device to appear.
    pub timeout: u64,
    /// After a failure: reboot (the default, so boot assessment can act) or power off.
    pub poweroff_on_failure: bool,
    pub init: String,
    /// Trusted boot (`rd.kairos.layers=` in a signed UKI's cmdline): the dm-verity root
    /// hash (or, for an image without a tree, the sha256) of every layer image, base first.
    /// The deployment must use exactly these; see [`layer_check`].
    pub pinned_layers: Vec<String>,
    /// `rd.kairos.verity=lazy`: dm-verity checks each block when it is read, and the whole
    /// image is not read through at boot (faster; a changed block in a file nobody reads
    /// at boot is refused later, with an I/O error, not by stopping the boot).
    pub verity_lazy: bool,
    /// `rd.kairos.securebootdisabled`: a trusted image may boot with Secure Boot off.
    pub allow_insecure: bool,
}

/// How a layer image is checked before it is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerCheck {
    /// Its size only (an unsigned boot without `rd.kairos.verify`).
    Size,
    /// The sha256 of the whole file (`rd.kairos.verify`, or a pinned image without a tree).
    Hash,
    /// Mounted through dm-verity with the pinned root hash; with `read_all`, every block is
    /// read (and so checked) before the boot goes on.
    Verity {
        verity: kairos_layers::verity::Verity,
        read_all: bool,
    },
}

/// The check for layer `i` of the deployment. A pinned layer with a tree goes through
/// dm-verity, whose root is the pin itself (the manifest only says where the tree starts,
/// which [`kairos_layers::verity::Verity::check`] bounds); a pinned layer without one is
/// hashed whole against the pin.
pub fn layer_check(
    plan: &Plan,
    i: usize,
    layer: &kairos_layers::Layer,
) -> Result<LayerCheck, PlanError> {
    let Some(pin) = plan.pinned_layers.get(i) else {
        if !plan.pinned_layers.is_empty() {
            return Err(PlanError(format!(
                "layer {} is not named by the signed boot entry ({} pinned)",
                i + 1,
                plan.pinned_layers.len()
            )));
        }
        return Ok(if plan.verify {
            LayerCheck::Hash
        } else {
            LayerCheck::Size
        });
    };
    match &layer.verity {
        Some(v) if v.root.eq_ignore_ascii_case(pin) => Ok(LayerCheck::Verity {
            verity: kairos_layers::verity::Verity {
                root: pin.clone(),
                data_size: v.data_size,
            },
            read_all: !plan.verity_lazy,
        }),
        _ if layer.image.sha256.eq_ignore_ascii_case(pin) => Ok(LayerCheck::Hash),
        _ => Err(PlanError(format!(
            "layer {} ({}) is not the one the signed boot entry names ({})",
            i + 1,
            layer.digest,
            &pin[..pin.len().min(12)]
        ))),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError(pub String);

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PlanError {}

/// Ephemeral paths (tmpfs upper) per mode — Kairos' shipped defaults.
pub fn rw_paths(mode: Mode) -> &'static [&'static str] {
    match mode {
        // Live: the whole root is an overlay with a tmpfs upper.
        Mode::Live => &[],
        Mode::Recovery => &[
            "/etc",
            "/root",
            "/home",
            "/opt",
            "/srv",
            "/usr/local",
            "/var",
        ],
        _ => &["/var", "/etc", "/srv"],
    }
}

/// Paths kept across boots on COS_PERSISTENT (not in recovery) — Kairos' shipped defaults.
pub const PERSISTENT_PATHS: &[&str] = &[
    "/etc/cni",
    "/etc/init.d",
    "/etc/iscsi",
    "/etc/k0s",
    "/etc/kubernetes",
    "/etc/modprobe.d",
    "/etc/pwx",
    "/etc/rancher",
    "/etc/runlevels",
    "/etc/ssh",
    "/etc/ssl/certs",
    "/etc/sysconfig",
    "/etc/systemd",
    "/etc/zfs",
    "/home",
    "/opt",
    "/root",
    "/usr/libexec",
    "/var/cores",
    "/var/lib/ca-certificates",
    "/var/lib/cni",
    "/var/lib/containerd",
    "/var/lib/calico",
    "/var/lib/dbus",
    "/var/lib/etcd",
    "/var/lib/extensions",
    "/var/lib/confexts",
    "/var/lib/k0s",
    "/var/lib/kubelet",
    "/var/lib/longhorn",
    "/var/lib/osd",
    "/var/lib/rancher",
    "/var/lib/rook",
    "/var/lib/tailscale",
    "/var/lib/wicked",
    "/var/lib/kairos",
    "/var/log",
];

/// `/etc/ssh` → `etc-ssh.bind`: where a persistent path's data lives under `/usr/local/.state`.
pub fn bind_name(path: &str) -> String {
    format!("{}.bind", path.trim_start_matches('/').replace('/', "-"))
}

/// `/var/lib/x` → `var-lib-x`: the tmpfs directory of an ephemeral path.
pub fn overlay_name(path: &str) -> String {
    path.trim_start_matches('/').replace('/', "-")
}

/// Persistent paths sorted so parents are bound before children (fewer components first).
pub fn sorted_persistent(paths: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = paths.iter().map(|s| s.to_string()).collect();
    v.sort_by_key(|p| {
        (
            p.matches('/').count(),
            p.rsplit('/').next().unwrap_or("").to_string(),
        )
    });
    v.dedup();
    v
}

/// The mode a systemd-boot entry id stands for (`active+2-1.conf` → active): a UKI's
/// cmdline is signed and the same for every role, so the entry's name says the role.
pub fn mode_of_entry(entry: &str) -> Option<Mode> {
    let stem = entry.strip_suffix(".conf").unwrap_or(entry);
    let name = stem.split('+').next().unwrap_or(stem);
    match name {
        "active" => Some(Mode::Active),
        "passive" => Some(Mode::Passive),
        "recovery" | "autoreset" => Some(Mode::Recovery),
        "live" => Some(Mode::Live),
        _ => None,
    }
}

impl Plan {
    pub fn from_cmdline(cmdline: &str) -> Result<Plan, PlanError> {
        Plan::from_boot(cmdline, None)
    }

    /// The plan for `cmdline`, booted from the systemd-boot entry `entry` (its id, from
    /// `LoaderEntrySelected`): the entry gives the mode when the cmdline does not.
    pub fn from_boot(cmdline: &str, entry: Option<&str>) -> Result<Plan, PlanError> {
        let mut deployment = None;
        let mut store = None;
        let mut mode = None;
        let mut plan = Plan {
            mode: Mode::Active,
            store_label: String::new(),
            deployment: String::new(),
            debug: false,
            verify: false,
            timeout: 30,
            poweroff_on_failure: false,
            init: "/sbin/init".into(),
            pinned_layers: Vec::new(),
            verity_lazy: false,
            allow_insecure: false,
        };
        for tok in kairos_config::cmdline::tokens(cmdline) {
            let (k, v) = tok.split_once('=').unwrap_or((tok.as_str(), ""));
            match k {
                "kairos.deployment" => deployment = Some(v.to_string()),
                "kairos.store" => store = Some(v.trim_start_matches("LABEL=").to_string()),
                "kairos.mode" => {
                    mode = Some(match v {
                        "active" => Mode::Active,
                        "passive" => Mode::Passive,
                        "recovery" => Mode::Recovery,
                        "live" => Mode::Live,
                        other => {
                            return Err(PlanError(format!(
                                "kairos.mode={other}: expected active, passive, recovery or live"
                            )));
                        }
                    })
                }
                "rd.kairos.debug" | "rd.immucore.debug" => plan.debug = true,
                "rd.kairos.verify" => plan.verify = true,
                "rd.kairos.verity" => match v {
                    "lazy" => plan.verity_lazy = true,
                    "full" => plan.verity_lazy = false,
                    other => {
                        return Err(PlanError(format!(
                            "rd.kairos.verity={other}: expected full (read every block at boot, the default) or lazy"
                        )));
                    }
                },
                kairos_layers::PINS_ARG => {
                    plan.pinned_layers = kairos_layers::parse_pins(v).map_err(PlanError)?;
                    plan.verify = true;
                }
                "rd.kairos.securebootdisabled" | "rd.immucore.securebootdisabled" => {
                    plan.allow_insecure = true
                }
                "rd.kairos.poweroff_on_failure" => plan.poweroff_on_failure = true,
                "rd.kairos.timeout" => {
                    plan.timeout = v.parse().map_err(|_| {
                        PlanError(format!("rd.kairos.timeout={v}: expected seconds"))
                    })?
                }
                "init" => plan.init = v.to_string(),
                _ => {}
            }
        }
        plan.deployment = deployment.filter(|d| !d.is_empty()).ok_or_else(|| {
            PlanError("the kernel cmdline has no kairos.deployment=<id>: the boot entry does not say what to boot".into())
        })?;
        plan.mode = mode.unwrap_or(match store.as_deref() {
            Some("COS_RECOVERY") => Mode::Recovery,
            Some("COS_LIVE") | Some("initrd") => Mode::Live,
            Some(_) => Mode::Active,
            None => entry.and_then(mode_of_entry).unwrap_or(Mode::Active),
        });
        plan.store_label = store.unwrap_or_else(|| match plan.mode {
            Mode::Recovery => "COS_RECOVERY".into(),
            Mode::Live => "COS_LIVE".into(),
            _ => "COS_STATE".into(),
        });
        Ok(plan)
    }
}

/// Partitions `install.encrypted_partitions` may name (Kairos' keys).
pub const ENCRYPTABLE: &[&str] = &["COS_OEM", "COS_PERSISTENT"];

/// What a partition that may be encrypted holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holds {
    /// A plain filesystem (or nothing recognised).
    Plain,
    /// A LUKS volume Kairos finished setting up.
    Luks,
    /// A LUKS volume whose set-up a power cut interrupted: no filesystem, no data.
    LuksUnfinished,
}

/// What immucore does with such a partition at this boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CryptAction {
    /// Mount it as it is.
    Plain,
    /// First boot asking for encryption: make a LUKS2 volume (keeping the content).
    Encrypt,
    /// Set-up was interrupted: make the volume again (there is no data in it to keep).
    Redo,
    /// Open it (TPM, else the console prompt).
    Open,
    /// Leave it closed (an unfinished volume where encrypting is not allowed).
    Skip,
}

/// The decision: `wanted` is whether the config lists the partition, `may_encrypt` whether
/// this boot may write partitions (active and passive boots; never recovery or live).
pub fn crypt_action(holds: Holds, wanted: bool, may_encrypt: bool) -> CryptAction {
    match holds {
        Holds::Luks => CryptAction::Open,
        Holds::LuksUnfinished if may_encrypt => CryptAction::Redo,
        Holds::LuksUnfinished => CryptAction::Skip,
        Holds::Plain if wanted && may_encrypt => CryptAction::Encrypt,
        Holds::Plain => CryptAction::Plain,
    }
}

/// `install.encrypted_partitions` from the merged config: the partitions to encrypt and
/// what to warn about (names Kairos cannot encrypt, a value that is not a list of names).
pub fn encrypted_partitions(config: &serde_json::Value) -> (Vec<&'static str>, Vec<String>) {
    let mut want = Vec::new();
    let mut warn = Vec::new();
    let v = &config["install"]["encrypted_partitions"];
    let items: Vec<&serde_json::Value> = match v {
        serde_json::Value::Null => Vec::new(),
        serde_json::Value::Array(a) => a.iter().collect(),
        other => {
            warn.push(format!(
                "install.encrypted_partitions must be a list of partition labels, not {other}: nothing is encrypted"
            ));
            Vec::new()
        }
    };
    for item in items {
        let name = item.as_str().unwrap_or_default();
        match ENCRYPTABLE.iter().find(|l| l.eq_ignore_ascii_case(name)) {
            Some(l) if !want.contains(l) => want.push(*l),
            Some(_) => {}
            None => warn.push(format!(
                "install.encrypted_partitions: {item} is not a partition Kairos encrypts ({}): left as it is",
                ENCRYPTABLE.join(", ")
            )),
        }
    }
    (want, warn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn how_each_layer_is_checked() {
        let h = |c: char| c.to_string().repeat(64);
        let layer = |sha: char, root: Option<char>| kairos_layers::Layer {
            digest: kairos_layers::Digest::of(b"x"),
            image: kairos_layers::Blob {
                file: "layers/x.erofs".into(),
                size: 3 * 4096,
                sha256: h(sha),
            },
            verity: root.map(|r| kairos_layers::verity::Verity {
                root: h(r),
                data_size: 2 * 4096,
            }),
        };
        let plain = Plan::from_cmdline("kairos.deployment=d").unwrap();
        assert_eq!(
            layer_check(&plain, 0, &layer('a', Some('b'))),
            Ok(LayerCheck::Size)
        );
        let verify = Plan::from_cmdline("kairos.deployment=d rd.kairos.verify").unwrap();
        assert_eq!(
            layer_check(&verify, 0, &layer('a', None)),
            Ok(LayerCheck::Hash)
        );
        let pinned = |extra: &str| {
            Plan::from_cmdline(&format!(
                "kairos.deployment=d rd.kairos.layers={},{} {extra}",
                h('b'),
                h('c')
            ))
            .unwrap()
        };
        let p = pinned("");
        match layer_check(&p, 0, &layer('a', Some('b'))) {
            Ok(LayerCheck::Verity { verity, read_all }) => {
                assert_eq!(verity.root, h('b'));
                assert!(read_all);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            layer_check(&pinned("rd.kairos.verity=lazy"), 0, &layer('a', Some('b'))),
            Ok(LayerCheck::Verity {
                read_all: false,
                ..
            })
        ));
        // No tree: the pin is the whole image's sha256.
        assert_eq!(layer_check(&p, 1, &layer('c', None)), Ok(LayerCheck::Hash));
        // A manifest that drops the tree of a layer pinned by its root: refused.
        assert!(layer_check(&p, 0, &layer('a', None)).is_err());
        // Another root in the manifest: refused, not mounted with the manifest's root.
        assert!(layer_check(&p, 0, &layer('a', Some('d'))).is_err());
        assert!(layer_check(&p, 2, &layer('a', None)).is_err());
        assert!(Plan::from_cmdline("kairos.deployment=d rd.kairos.verity=maybe").is_err());
    }

    #[test]
    fn cmdline() {
        let p = Plan::from_cmdline("console=ttyS0 kairos.deployment=v1 rd.immucore.debug").unwrap();
        assert_eq!(
            (
                p.mode,
                p.store_label.as_str(),
                p.deployment.as_str(),
                p.debug
            ),
            (Mode::Active, "COS_STATE", "v1", true)
        );
        let p = Plan::from_cmdline("kairos.deployment=r kairos.store=LABEL=COS_RECOVERY").unwrap();
        assert_eq!(p.mode, Mode::Recovery);
        let p = Plan::from_cmdline("kairos.deployment=r kairos.mode=passive init=/bin/sh").unwrap();
        assert_eq!(
            (p.mode, p.store_label.as_str(), p.init.as_str()),
            (Mode::Passive, "COS_STATE", "/bin/sh")
        );
        assert!(
            Plan::from_cmdline("quiet")
                .unwrap_err()
                .0
                .contains("kairos.deployment")
        );
        assert!(Plan::from_cmdline("kairos.deployment=x kairos.mode=weird").is_err());
        let p = Plan::from_cmdline("kairos.deployment=l kairos.store=LABEL=COS_LIVE").unwrap();
        assert_eq!(
            (p.mode, p.mode.store_mountpoint()),
            (Mode::Live, "/run/initramfs/live")
        );
    }

    #[test]
    fn trusted_cmdline_and_entry() {
        let h1 = "a".repeat(64);
        let h2 = "B".repeat(64);
        let cmd = format!("console=ttyS0 kairos.deployment=d-1 rd.kairos.layers={h1},{h2}");
        let p = Plan::from_boot(&cmd, Some("passive+2-1.conf")).unwrap();
        assert_eq!(p.mode, Mode::Passive);
        assert_eq!(p.store_label, "COS_STATE");
        assert_eq!(p.pinned_layers, vec![h1.clone(), "b".repeat(64)]);
        assert!(p.verify && !p.allow_insecure);
        let p = Plan::from_boot(&cmd, Some("recovery.conf")).unwrap();
        assert_eq!(
            (p.mode, p.store_label.as_str()),
            (Mode::Recovery, "COS_RECOVERY")
        );
        let p = Plan::from_boot(&cmd, Some("autoreset.conf")).unwrap();
        assert_eq!(p.mode, Mode::Recovery);
        // No entry (booted as BOOTX64.EFI): active. The cmdline wins over the entry.
        assert_eq!(Plan::from_boot(&cmd, None).unwrap().mode, Mode::Active);
        let p = Plan::from_boot(
            "kairos.deployment=x kairos.mode=active",
            Some("recovery.conf"),
        );
        assert_eq!(p.unwrap().mode, Mode::Active);
        for bad in ["zz", &"a".repeat(63), &format!("{h1},")] {
            let e = Plan::from_cmdline(&format!("kairos.deployment=x rd.kairos.layers={bad}"));
            assert!(e.unwrap_err().0.contains("rd.kairos.layers"), "{bad}");
        }
        let many = vec![h1.as_str(); kairos_layers::MAX_PINS + 1].join(",");
        assert!(
            Plan::from_cmdline(&format!("kairos.deployment=x rd.kairos.layers={many}")).is_err()
        );
        assert!(
            Plan::from_cmdline("kairos.deployment=x rd.kairos.securebootdisabled")
                .unwrap()
                .allow_insecure
        );
    }

    #[test]
    fn names_and_order() {
        assert_eq!(bind_name("/etc/ssh"), "etc-ssh.bind");
        assert_eq!(overlay_name("/var/lib/x"), "var-lib-x");
        let s = sorted_persistent(&["/var/lib/rancher", "/home", "/etc/ssh", "/var/log", "/etc"]);
        assert_eq!(
            s,
            vec!["/etc", "/home", "/var/log", "/etc/ssh", "/var/lib/rancher"]
        );
    }

    #[test]
    fn crypt_actions() {
        use CryptAction as A;
        assert_eq!(crypt_action(Holds::Plain, true, true), A::Encrypt);
        assert_eq!(crypt_action(Holds::Plain, true, false), A::Plain);
        assert_eq!(crypt_action(Holds::Plain, false, true), A::Plain);
        // An encrypted partition opens whatever the config says now (it may be on COS_OEM).
        assert_eq!(crypt_action(Holds::Luks, false, false), A::Open);
        assert_eq!(crypt_action(Holds::Luks, true, true), A::Open);
        assert_eq!(crypt_action(Holds::LuksUnfinished, false, true), A::Redo);
        assert_eq!(crypt_action(Holds::LuksUnfinished, true, false), A::Skip);
    }

    #[test]
    fn encrypted_partitions_from_the_config() {
        let c = serde_json::json!({"install": {"encrypted_partitions": ["COS_PERSISTENT", "cos_oem", "COS_PERSISTENT", "COS_STATE"]}});
        let (want, warn) = encrypted_partitions(&c);
        assert_eq!(want, vec!["COS_PERSISTENT", "COS_OEM"]);
        assert_eq!(warn.len(), 1);
        assert!(
            warn[0].contains("\"COS_STATE\" is not a partition Kairos encrypts"),
            "{warn:?}"
        );
        assert_eq!(
            encrypted_partitions(&serde_json::json!({})),
            (vec![], vec![])
        );
        let (want, warn) = encrypted_partitions(
            &serde_json::json!({"install": {"encrypted_partitions": "COS_OEM"}}),
        );
        assert!(want.is_empty());
        assert!(warn[0].contains("must be a list"), "{warn:?}");
    }
}
