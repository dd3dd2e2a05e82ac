//! The typed Kairos config: every key we act on, with the spellings Kairos accepts.
//!
//! Decoding is lenient as Go's is (unknown keys ignored, null is the zero value, see
//! [`crate::decode`]); the JSON Schema generated from these types is strict (unknown keys
//! are listed), so `validate` reports a typo such as `k3s: {enable: true}` with a did-you-mean
//! while a stage still applies the keys it knows.

use std::collections::BTreeMap;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value as Json;

/// A boolean that also takes the YAML 1.1 words go-yaml accepts for typed bools
/// (`yes`, `no`, `on`, `off`, `y`, `n`) and `"true"`/`"false"` strings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct GoBool(pub bool);

const TRUE_WORDS: &[&str] = &[
    "y", "Y", "yes", "Yes", "YES", "on", "On", "ON", "true", "True", "TRUE",
];
const FALSE_WORDS: &[&str] = &[
    "n", "N", "no", "No", "NO", "off", "Off", "OFF", "false", "False", "FALSE",
];

impl<'de> Deserialize<'de> for GoBool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Json::deserialize(d)? {
            Json::Bool(b) => Ok(GoBool(b)),
            Json::Null => Ok(GoBool(false)),
            Json::String(s) if TRUE_WORDS.contains(&s.as_str()) => Ok(GoBool(true)),
            Json::String(s) if FALSE_WORDS.contains(&s.as_str()) => Ok(GoBool(false)),
            other => Err(serde::de::Error::custom(format!(
                "expected a boolean, found {other}"
            ))),
        }
    }
}

impl JsonSchema for GoBool {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "GoBool".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let words: Vec<&str> = TRUE_WORDS.iter().chain(FALSE_WORDS).copied().collect();
        json_schema!({
            "description": "true or false (yes/no/on/off are accepted as go-yaml does)",
            "anyOf": [{"type": "boolean"}, {"type": "string", "enum": words}]
        })
    }
}

/// A scalar used as text: `sysctl` values, `environment` values, `uid`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Json::deserialize(d)? {
            Json::String(s) => Ok(Text(s)),
            Json::Number(n) => Ok(Text(n.to_string())),
            Json::Bool(b) => Ok(Text(b.to_string())),
            Json::Null => Ok(Text(String::new())),
            other => Err(serde::de::Error::custom(format!(
                "expected a scalar, found {other}"
            ))),
        }
    }
}

impl JsonSchema for Text {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Scalar".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": ["string", "integer", "number", "boolean", "null"]})
    }
}

/// A file mode. YAML integers follow Go's base-0 rules (`0644` is octal, `644` decimal) — the
/// YAML layer already did that; a string is read the same way (`"0644"`, `"0o644"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct FileMode(pub u32);

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Json::deserialize(d)? {
            Json::Number(n) => n
                .as_u64()
                .filter(|m| *m <= 0o7777)
                .map(|m| FileMode(m as u32))
                .ok_or_else(|| serde::de::Error::custom(format!("file mode {n} out of range"))),
            Json::String(s) => crate::yaml::go_int(s.trim())
                .filter(|m| (0..=0o7777).contains(m))
                .map(|m| FileMode(m as u32))
                .ok_or_else(|| serde::de::Error::custom(format!("not a file mode: {s:?}"))),
            Json::Null => Ok(FileMode(0)),
            other => Err(serde::de::Error::custom(format!(
                "expected a file mode, found {other}"
            ))),
        }
    }
}

impl JsonSchema for FileMode {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "FileMode".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "file mode; write 0644 (octal, as in Go) — 644 is decimal",
            "anyOf": [{"type": "integer", "minimum": 0, "maximum": 4095},
                      {"type": "string", "pattern": "^(0[oO]?)?[0-7]{1,4}$"}]
        })
    }
}

/// cloud-init's `write_files[].permissions`: an octal string (`"0644"` and `"644"` are both 420).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct OctalString(pub u32);

impl<'de> Deserialize<'de> for OctalString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Json::deserialize(d)? {
            Json::String(s) => {
                let t = s.trim();
                let t = t.strip_prefix("0o").unwrap_or(t);
                u32::from_str_radix(t, 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .map(OctalString)
                    .ok_or_else(|| serde::de::Error::custom(format!("not an octal mode: {s:?}")))
            }
            Json::Number(n) => Ok(OctalString(n.as_u64().unwrap_or(0) as u32)),
            Json::Null => Ok(OctalString(0)),
            other => Err(serde::de::Error::custom(format!(
                "expected an octal string, found {other}"
            ))),
        }
    }
}

impl JsonSchema for OctalString {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "OctalString".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"anyOf": [{"type": "string", "pattern": "^(0[oO]?)?[0-7]{1,4}$"}, {"type": "integer"}]})
    }
}

/// A string or a list of strings (cloud-init `groups: "a,b"` or `[a, b]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct StringList(pub Vec<String>);

impl<'de> Deserialize<'de> for StringList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Json::deserialize(d)? {
            Json::String(s) => Ok(StringList(
                s.split(',')
                    .map(|x| x.trim().to_string())
                    .filter(|x| !x.is_empty())
                    .collect(),
            )),
            Json::Array(a) => a
                .into_iter()
                .map(|v| match v {
                    Json::String(s) => Ok(s),
                    other => Err(serde::de::Error::custom(format!(
                        "expected a string, found {other}"
                    ))),
                })
                .collect::<Result<_, _>>()
                .map(StringList),
            Json::Null => Ok(StringList::default()),
            other => Err(serde::de::Error::custom(format!(
                "expected a list of strings, found {other}"
            ))),
        }
    }
}

impl JsonSchema for StringList {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "StringList".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}, {"type": "null"}]})
    }
}

type Map<T> = BTreeMap<String, T>;

/// A key written with no value (`ssh_authorized_keys:` followed only by a comment) is YAML
/// null, and Go's decoder leaves the field at its zero value: an empty list, an empty map,
/// false, unset. Every config field reads null that way.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

macro_rules! config_struct {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
        #[serde(default)]
        #[schemars(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fm])* #[serde(deserialize_with = "nullable")] pub $field: $ty),*
        }
    };
}

config_struct!(
    /// The whole Kairos config document.
    Config {
        /// Users to create (cloud-init compatible; applied at the `boot` stage).
        users: Vec<CloudUser>,
        /// Hostname (cloud-init compatible; applied at the `initramfs` stage).
        hostname: Option<String>,
        /// Commands run at the `boot` stage (cloud-init compatible).
        runcmd: Vec<String>,
        /// Files written at the `boot` stage (cloud-init compatible).
        write_files: Vec<WriteFile>,
        /// Legacy spelling of `write_files`.
        milpa_files: Vec<WriteFile>,
        /// SSH keys added to every listed user (or root when there are none).
        ssh_authorized_keys: Vec<String>,
        growpart: Option<Growpart>,
        /// Name of this config, used as the prefix of its stage steps.
        name: Option<String>,
        /// yip stages: stage name → ordered steps.
        stages: Map<Vec<Step>>,
        install: Option<Install>,
        upgrade: Option<Upgrade>,
        /// How a newly upgraded deployment proves itself before it is kept.
        boot_assessment: Option<BootAssessment>,
        reset: Option<Reset>,
        /// URL of more config; fetched values win over this file's.
        config_url: Option<String>,
        options: Map<Json>,
        bundles: Vec<Bundle>,
        fail_on_bundles_errors: GoBool,
        grub_options: Map<Text>,
        /// `KEY=VALUE` pairs exported before actions.
        env: Vec<String>,
        debug: GoBool,
        /// Fail on stage errors and config validation problems instead of warning.
        strict: GoBool,
        /// Extra directories scanned for stages.
        #[serde(rename = "cloud-init-paths")]
        cloud_init_paths: Vec<String>,
        #[serde(rename = "eject-cd")]
        eject_cd: GoBool,
        cosign: GoBool,
        verify: GoBool,
        #[serde(rename = "cosign-key")]
        cosign_key: Option<String>,
        arch: Option<String>,
        #[serde(rename = "squash-compression")]
        squash_compression: Vec<String>,
        #[serde(rename = "squash-no-compression")]
        squash_no_compression: Option<GoBool>,
        #[serde(rename = "uki-max-entries")]
        uki_max_entries: Option<u32>,
        #[serde(rename = "bind-pcrs")]
        bind_pcrs: Vec<Text>,
        #[serde(rename = "bind-public-pcrs")]
        bind_public_pcrs: Vec<Text>,
        logs: Option<Logs>,
        kcrypt: Option<Kcrypt>,
        phonehome: Option<Map<Json>>,
        p2p: Option<P2p>,
        k3s: Option<K8sDistro>,
        #[serde(rename = "k3s-agent")]
        k3s_agent: Option<K8sDistro>,
        k0s: Option<K8sDistro>,
        #[serde(rename = "k0s-worker")]
        k0s_worker: Option<K8sDistro>,
        kubevip: Option<KubeVip>,
        /// The cluster-plugin block (kairos-sdk `clusterplugin`, e.g. the kubeadm provider).
        cluster: Option<Cluster>,
        fullcloudconfig: GoBool,
        platform: Option<Map<Json>>,
    }
);

config_struct!(
    /// A cloud-init user.
    CloudUser {
        name: String,
        passwd: Option<String>,
        #[serde(alias = "lockPasswd")]
        lock_passwd: GoBool,
        groups: StringList,
        ssh_authorized_keys: Vec<String>,
        gecos: Option<String>,
        homedir: Option<String>,
        no_create_home: GoBool,
        primary_group: Option<String>,
        no_user_group: GoBool,
        system: GoBool,
        no_log_init: GoBool,
        shell: Option<String>,
        uid: Option<Text>,
    }
);

config_struct!(
    /// A cloud-init file.
    WriteFile {
        path: String,
        content: String,
        encoding: Option<String>,
        /// `user[:group]`.
        owner: Option<String>,
        permissions: Option<OctalString>,
        append: GoBool,
    }
);

config_struct!(Growpart { devices: Vec<String>, mode: Option<String>, ignore_growroot_disabled: GoBool });

config_struct!(
    /// One yip step. Modules run in yip's fixed order whatever their order here.
    Step {
        name: Option<String>,
        /// Shell condition; the step is skipped when it exits non-zero.
        #[serde(rename = "if")]
        if_: Option<String>,
        /// Regex on the hostname.
        node: Option<String>,
        only_os: Option<String>,
        only_os_version: Option<String>,
        only_arch: Option<String>,
        only_service_manager: Option<String>,
        if_files: Option<IfFiles>,
        after: Vec<After>,
        commands: Vec<String>,
        files: Vec<StepFile>,
        downloads: Vec<Download>,
        directories: Vec<Directory>,
        dns: Option<Dns>,
        hostname: Option<String>,
        sysctl: Map<Text>,
        users: Map<StepUser>,
        authorized_keys: Map<Vec<String>>,
        ensure_entities: Vec<Entity>,
        delete_entities: Vec<Entity>,
        modules: Vec<String>,
        timesyncd: Map<Text>,
        systemctl: Option<Systemctl>,
        environment: Map<Text>,
        environment_file: Option<String>,
        systemd_firstboot: Map<Text>,
        datasource: Option<Datasource>,
        layout: Option<Layout>,
        git: Option<Git>,
        packages: Option<Packages>,
        package_pins: Map<Text>,
        unpack_images: Vec<UnpackImage>,
    }
);

config_struct!(IfFiles { any: Vec<String>, all: Vec<String>, none: Vec<String> });
config_struct!(After { name: String });

config_struct!(
    /// A yip file (`ownerstring` is `user[:group]` and wins over `owner`/`group`).
    StepFile {
        path: String,
        permissions: FileMode,
        owner: Option<i64>,
        group: Option<i64>,
        content: String,
        encoding: Option<String>,
        ownerstring: Option<String>,
    }
);

config_struct!(Download {
    path: String,
    url: String,
    permissions: FileMode,
    owner: Option<i64>,
    group: Option<i64>,
    timeout: Option<u64>,
    ownerstring: Option<String>,
});

config_struct!(Directory { path: String, permissions: FileMode, owner: Option<i64>, group: Option<i64> });
config_struct!(Dns { nameservers: Vec<String>, search: Vec<String>, options: Vec<String>, path: Option<String> });

config_struct!(
    /// A yip user.
    StepUser {
        name: Option<String>,
        passwd: Option<String>,
        #[serde(alias = "lockPasswd")]
        lock_passwd: GoBool,
        gecos: Option<String>,
        homedir: Option<String>,
        no_create_home: GoBool,
        primary_group: Option<String>,
        groups: StringList,
        ssh_authorized_keys: Vec<String>,
        system: GoBool,
        no_user_group: GoBool,
        no_log_init: GoBool,
        shell: Option<String>,
        uid: Option<Text>,
    }
);

config_struct!(Entity { path: Option<String>, entity: String });

config_struct!(Systemctl {
    enable: Vec<String>,
    disable: Vec<String>,
    mask: Vec<String>,
    start: Vec<String>,
    overrides: Vec<UnitOverride>,
});
config_struct!(UnitOverride { service: String, content: String, name: Option<String> });
config_struct!(Datasource { providers: Vec<String>, path: Option<String>, userdata_name: Option<String> });

config_struct!(Layout {
    device: Option<LayoutDevice>,
    add_partitions: Vec<LayoutPartition>,
    expand_partition: Option<ExpandPartition>,
});
config_struct!(LayoutDevice { path: Option<String>, label: Option<String>, init_disk: GoBool, disk_name: Option<String> });
config_struct!(LayoutPartition {
    #[serde(rename = "fsLabel")]
    fs_label: Option<String>,
    size: u64,
    #[serde(rename = "pLabel")]
    p_label: Option<String>,
    filesystem: Option<String>,
    bootable: GoBool,
});
config_struct!(ExpandPartition { size: u64 });

config_struct!(Git {
    url: String,
    path: String,
    branch: Option<String>,
    branch_only: GoBool,
    auth: Option<GitAuth>,
});
config_struct!(GitAuth {
    username: Option<String>,
    password: Option<String>,
    private_key: Option<String>,
    insecure: GoBool,
    public_key: Option<String>,
});
config_struct!(Packages { install: Vec<String>, remove: Vec<String>, refresh: GoBool, upgrade: GoBool });
config_struct!(UnpackImage { source: String, target: String, platform: Option<String> });

config_struct!(
    /// `install:` — how `kairos-agent install` lays out and fills the disk.
    Install {
        auto: GoBool,
        reboot: GoBool,
        poweroff: GoBool,
        /// `auto`, a `/dev/…` path or `script://…`.
        device: Option<InstallDevice>,
        #[serde(rename = "no-format", alias = "no_format")]
        no_format: GoBool,
        force: GoBool,
        #[serde(alias = "image")]
        source: Option<String>,
        system: Option<SystemImage>,
        #[serde(rename = "recovery-system")]
        recovery_system: Option<SystemImage>,
        passive: Option<SystemImage>,
        partitions: Option<Partitions>,
        #[serde(rename = "extra-partitions")]
        extra_partitions: Vec<ExtraPartition>,
        #[serde(rename = "extra-dirs-rootfs")]
        extra_dirs_rootfs: Vec<String>,
        grub_options: Option<GrubOptions>,
        #[serde(rename = "grub-entry-name")]
        grub_entry_name: Option<String>,
        bundles: Vec<Bundle>,
        encrypted_partitions: Vec<String>,
        skip_copy_kcrypt_plugin: GoBool,
        env: Vec<String>,
        bind_mounts: Vec<String>,
        ephemeral_mounts: Vec<String>,
        nousers: GoBool,
        ssh_hardening: GoBool,
        #[serde(rename = "cloud-init")]
        cloud_init: Vec<String>,
        iso: Option<String>,
        tty: Option<String>,
        firmware: Option<String>,
        #[serde(rename = "part-table")]
        part_table: Option<String>,
        #[serde(rename = "allow-insecure-registries")]
        allow_insecure_registries: GoBool,
        #[serde(rename = "skip-entries")]
        skip_entries: Vec<String>,
    }
);

/// `install.device`: `auto`, `/dev/…` or `script://…`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstallDevice(pub String);

impl JsonSchema for InstallDevice {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "InstallDevice".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "`auto` (largest non-removable disk), a /dev path or script://",
            "type": "string", "pattern": "^(auto|/dev/.+|script://.+)$"
        })
    }
}

config_struct!(SystemImage {
    source: Option<String>,
    #[serde(alias = "uri")]
    uri: Option<String>,
    size: Option<u64>,
    label: Option<String>,
    fs: Option<String>,
});
config_struct!(Partitions {
    oem: Option<PartitionSpec>,
    recovery: Option<PartitionSpec>,
    state: Option<PartitionSpec>,
    persistent: Option<PartitionSpec>,
    efi: Option<PartitionSpec>,
});
config_struct!(PartitionSpec { size: Option<u64>, fs: Option<String> });
config_struct!(ExtraPartition { name: Option<String>, label: Option<String>, size: Option<u64>, fs: Option<String> });
config_struct!(GrubOptions {
    next_entry: Option<String>,
    saved_entry: Option<String>,
    default_menu_entry: Option<String>,
    default_fallback: Option<String>,
    extra_cmdline: Option<String>,
    extra_active_cmdline: Option<String>,
    extra_passive_cmdline: Option<String>,
    extra_recovery_cmdline: Option<String>,
});
config_struct!(Bundle {
    repository: Option<String>,
    rootfs_path: Option<String>,
    db_path: Option<String>,
    local_file: GoBool,
    targets: Vec<String>,
});

config_struct!(
    /// `upgrade:` — defaults for `kairos-agent upgrade`.
    Upgrade {
        reboot: GoBool,
        poweroff: GoBool,
        recovery: GoBool,
        entry: Option<String>,
        system: Option<SystemImage>,
        #[serde(rename = "recovery-system")]
        recovery_system: Option<SystemImage>,
        #[serde(rename = "grub-entry-name")]
        grub_entry_name: Option<String>,
        #[serde(rename = "extra-dirs-rootfs")]
        extra_dirs_rootfs: Vec<String>,
        #[serde(rename = "excluded-paths")]
        excluded_paths: Vec<String>,
        #[serde(rename = "allow-insecure-registries")]
        allow_insecure_registries: GoBool,
    }
);

config_struct!(
    /// `boot_assessment:` — after an upgrade the new deployment boots with `tries` attempts;
    /// it is kept once the `boot` stage is done and every health check exits 0, and after
    /// `tries` failed boots the previous deployment boots by itself.
    BootAssessment {
        /// Shell commands run after the `boot` stage; all must exit 0.
        health_checks: Vec<String>,
        /// Seconds each check may take (default 60).
        timeout: Option<u64>,
        /// Boot attempts for a new deployment (default 3).
        tries: Option<u32>,
    }
);

config_struct!(
    /// `reset:` — defaults for `kairos-agent reset`.
    Reset {
        reboot: GoBool,
        poweroff: GoBool,
        #[serde(rename = "reset-persistent")]
        reset_persistent: Option<GoBool>,
        #[serde(rename = "reset-oem")]
        reset_oem: GoBool,
        system: Option<SystemImage>,
        #[serde(rename = "grub-entry-name")]
        grub_entry_name: Option<String>,
        #[serde(rename = "extra-dirs-rootfs")]
        extra_dirs_rootfs: Vec<String>,
        tty: Option<String>,
    }
);

config_struct!(Logs { journal: Vec<String>, files: Vec<String> });
config_struct!(Kcrypt {
    challenger: Option<KcryptChallenger>,
    nv_index: Option<Text>,
    c_index: Option<Text>,
    tpm_device: Option<String>,
});
config_struct!(KcryptChallenger {
    challenger_server: Option<String>,
    mdns: GoBool,
    certificate: Option<String>,
    nv_index: Option<Text>,
    c_index: Option<Text>,
    tpm_device: Option<String>,
});

/// `p2p.role`: a role forced by hand. `""` is the same as leaving it out (as in
/// provider-kairos); `none` is refused, as provider-kairos refuses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum P2pRole {
    #[serde(rename = "")]
    Unset,
    Auto,
    Master,
    Worker,
}

impl P2p {
    /// The role set by hand, if any (`""` and `auto` force nothing).
    pub fn forced_role(&self) -> Option<&P2pRole> {
        self.role
            .as_ref()
            .filter(|r| matches!(r, P2pRole::Master | P2pRole::Worker))
    }
}

config_struct!(
    /// `p2p:` — mesh networking and automatic cluster formation.
    P2p {
        /// The network token (`kairos-agent p2p generate-token`); setting it starts the mesh.
        network_token: Option<String>,
        /// Ledger bucket of cluster coordination (default `kairos`).
        network_id: Option<String>,
        role: Option<P2pRole>,
        /// Serve mesh names (`<hostname>.<dns_domain>`) on 127.0.0.1:53 and forward the rest.
        dns: GoBool,
        /// The DNS domain of mesh names (kairos-rs; default `mesh`).
        dns_domain: Option<String>,
        loglevel: Option<String>,
        vpn: Option<P2pVpn>,
        minimum_nodes: Option<u32>,
        /// No DHT at all (discovery by mDNS and `bootstrap_peers` only).
        disable_dht: GoBool,
        auto: Option<P2pAuto>,
        dynamic_roles: GoBool,
        /// Peers always dialled, as multiaddrs `/ip4/…/tcp/…/p2p/<peer id>` (kairos-rs).
        bootstrap_peers: Vec<String>,
        /// Where the mesh host listens (kairos-rs; default `/ip4/0.0.0.0/tcp/0`).
        listen_addresses: Vec<String>,
        /// Find peers on the LAN by mDNS (kairos-rs; default true).
        mdns: Option<GoBool>,
        /// Most mesh connections at once (kairos-rs; default 64).
        max_connections: Option<u32>,
    }
);
config_struct!(
    /// `p2p.vpn:` — the mesh VPN device.
    P2pVpn {
        /// Create the VPN device (default true); false runs the mesh without it.
        create: Option<GoBool>,
        /// Let Kubernetes use the VPN (default true).
        #[serde(rename = "use")]
        use_: Option<GoBool>,
        /// EdgeVPN environment (`ADDRESS`, `IFACE`, `EDGEVPNMTU`, `DHCP`, …); the typed keys
        /// below win over it.
        env: Map<Text>,
        /// A fixed address with its prefix (`10.1.0.5/24`); without it, DHCP over the ledger.
        address: Option<String>,
        /// Interface MTU (default 1200, as EdgeVPN).
        mtu: Option<u32>,
        /// Interface name (default `edgevpn0`).
        interface: Option<String>,
    }
);
config_struct!(P2pAuto { enable: Option<GoBool>, ha: Option<P2pHa> });
config_struct!(P2pHa { enable: GoBool, external_db: Option<String>, master_nodes: Option<u32> });

config_struct!(
    /// `k3s:`, `k3s-agent:`, `k0s:`, `k0s-worker:`.
    K8sDistro {
        /// Start this distribution on the node. (Note: `enabled`, not `enable`.)
        enabled: GoBool,
        env: Map<Text>,
        args: Vec<String>,
        replace_env: GoBool,
        replace_args: GoBool,
        embedded_registry: GoBool,
    }
);

/// `cluster.role` of the cluster-plugin providers: `init` (the one node that initialises the
/// cluster and its etcd), `controlplane`, `worker`, or `none` (not part of a cluster).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ClusterRole {
    Init,
    #[serde(rename = "controlplane")]
    ControlPlane,
    Worker,
    None,
}

config_struct!(
    /// `cluster:` — read by cluster-plugin providers (kubeadm, k3s, rke2 plugins); Kairos only
    /// checks its shape.
    Cluster {
        /// Shared by every member; tells clusters on one network apart.
        cluster_token: Option<String>,
        /// A host every node can resolve, used to register with the control plane.
        control_plane_host: Option<String>,
        role: Option<ClusterRole>,
        /// Free-form configuration passed to the provider as text.
        config: Option<String>,
        env: Map<Text>,
        ca_certs: Vec<String>,
        provider_options: Map<Json>,
        import_local_images: GoBool,
        local_images_path: Option<String>,
    }
);

config_struct!(KubeVip {
    eip: Option<String>,
    manifest_url: Option<String>,
    interface: Option<String>,
    enable: Option<GoBool>,
    static_pod: GoBool,
    version: Option<String>,
    image: Option<String>,
});

/// Other spellings Kairos accepts (its schema and its code disagree on these):
/// (type, alias, canonical key).
const ALIASES: &[(&str, &str, &str)] = &[
    ("CloudUser", "lockPasswd", "lock_passwd"),
    ("StepUser", "lockPasswd", "lock_passwd"),
    ("Install", "no_format", "no-format"),
    ("Install", "image", "source"),
];

/// The JSON Schema of [`Config`].
pub fn schema() -> Json {
    let mut s = serde_json::to_value(schemars::schema_for!(Config)).expect("schema serialises");
    if let Some(o) = s.as_object_mut() {
        o.insert("title".into(), Json::String("Kairos cloud-config".into()));
    }
    // Every key may be written with no value (null), which reads as its zero value.
    nullable_properties(&mut s);
    // schemars leaves serde aliases out; the schema must accept what the parser accepts.
    for (ty, alias, canonical) in ALIASES {
        if let Some(props) = s
            .pointer_mut(&format!("/$defs/{ty}/properties"))
            .and_then(Json::as_object_mut)
            && let Some(mut p) = props.get(*canonical).cloned()
        {
            if let Some(po) = p.as_object_mut() {
                po.insert(
                    "description".into(),
                    Json::String(format!("Same as `{canonical}`.")),
                );
            }
            props.insert(alias.to_string(), p);
        }
    }
    s
}

/// Lets every property of every object definition be null (see [`nullable`]).
fn nullable_properties(s: &mut Json) {
    fn fix(prop: &mut Json) {
        let Some(o) = prop.as_object_mut() else {
            return;
        };
        match o.get_mut("type") {
            Some(Json::String(t)) if t != "null" => {
                let t = t.clone();
                o.insert("type".into(), serde_json::json!([t, "null"]));
            }
            Some(Json::Array(ts)) => {
                if !ts.iter().any(|t| t == "null") {
                    ts.push(Json::String("null".into()));
                }
            }
            Some(_) => {}
            None => {
                let has_null = o
                    .get("anyOf")
                    .and_then(Json::as_array)
                    .is_some_and(|a| a.iter().any(|b| b.get("type").is_some_and(|t| t == "null")));
                if !has_null {
                    let inner = Json::Object(std::mem::take(o));
                    o.insert("anyOf".into(), serde_json::json!([inner, {"type": "null"}]));
                }
            }
        }
    }
    fn walk(def: &mut Json) {
        if let Some(props) = def.get_mut("properties").and_then(Json::as_object_mut) {
            for p in props.values_mut() {
                fix(p);
                // A map's values may be empty too (`users: {kairos: }`).
                if let Some(a) = p.get_mut("additionalProperties").filter(|a| a.is_object()) {
                    fix(a);
                }
                for b in p
                    .get_mut("anyOf")
                    .and_then(Json::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    if let Some(a) = b.get_mut("additionalProperties").filter(|a| a.is_object()) {
                        fix(a);
                    }
                }
            }
        }
    }
    walk(s);
    if let Some(defs) = s.get_mut("$defs").and_then(Json::as_object_mut) {
        for d in defs.values_mut() {
            walk(d);
        }
    }
}
