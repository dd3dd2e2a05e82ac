//! A node's Kubernetes service from its cloud-config, as provider-kairos writes it.
//!
//! For each of `k3s` (server), `k3s-agent`, `k0s` (controller) and `k0s-worker`:
//! - the **env file** — systemd: `/etc/sysconfig/<service>` (read by the k3s unit's
//!   `EnvironmentFile=-/etc/sysconfig/%N`); OpenRC: `/etc/rancher/k3s/<service>.env` (k0s:
//!   `/etc/k0s/<service>.env`) — in godotenv's format, keys sorted, from `<key>.env` merged
//!   over what the role adds, or alone with `replace_env`;
//! - the **command** `<binary> <server|agent|controller|worker> <args>`: the role's args,
//!   `--embedded-registry` for `k3s.embedded_registry`, then `<key>.args` (or `<key>.args`
//!   alone with `replace_args`), joined by spaces as Kairos does — so systemd's own
//!   word-splitting and `$VAR` expansion apply as they do for Go Kairos users;
//! - systemd: the drop-in `/etc/systemd/system/<service>.service.d/override.conf` clearing
//!   `ExecStart=` and setting it; OpenRC: `/etc/init.d/<service>` (supervise-daemon, the env
//!   file sourced), since OpenRC has no drop-ins.
//!
//! A block that is not enabled has its files removed and its service disabled, so turning
//! `enabled` off in the config and rebooting stops it (Go Kairos writes once and never looks
//! again: `/usr/local/.kairos/deployed`). Choices where Kairos is silent: a node runs one
//! distribution in one role, so two enabled blocks are refused; values and args with a
//! newline or NUL are refused (they would end the unit line and start another directive), and
//! under OpenRC args with `"`, `` ` ``, `$` or `\` too (`command_args` is evaluated by a
//! shell).

use std::collections::BTreeMap;

use kairos_config::types::{Config, K8sDistro};

/// The node's service manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceManager {
    Systemd,
    OpenRc,
}

/// One of the four blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    K3sServer,
    K3sAgent,
    K0sController,
    K0sWorker,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::K3sServer,
        Kind::K3sAgent,
        Kind::K0sController,
        Kind::K0sWorker,
    ];

    /// The cloud-config key.
    pub fn key(self) -> &'static str {
        match self {
            Kind::K3sServer => "k3s",
            Kind::K3sAgent => "k3s-agent",
            Kind::K0sController => "k0s",
            Kind::K0sWorker => "k0s-worker",
        }
    }

    /// The service name (the units k3s' and k0s' installers create).
    pub fn service(self) -> &'static str {
        match self {
            Kind::K3sServer => "k3s",
            Kind::K3sAgent => "k3s-agent",
            Kind::K0sController => "k0scontroller",
            Kind::K0sWorker => "k0sworker",
        }
    }

    /// The binary's sub-command.
    pub fn subcommand(self) -> &'static str {
        match self {
            Kind::K3sServer => "server",
            Kind::K3sAgent => "agent",
            Kind::K0sController => "controller",
            Kind::K0sWorker => "worker",
        }
    }

    /// `k3s` or `k0s`: the binary's name, and kairosify's flag (`--k3s PATH`).
    pub fn distro(self) -> &'static str {
        match self {
            Kind::K3sServer | Kind::K3sAgent => "k3s",
            Kind::K0sController | Kind::K0sWorker => "k0s",
        }
    }

    /// Where kairosify puts the binary.
    pub fn binary(self) -> String {
        format!("/usr/bin/{}", self.distro())
    }

    fn is_k3s(self) -> bool {
        self.distro() == "k3s"
    }

    pub fn env_file(self, sm: ServiceManager) -> String {
        match (sm, self.is_k3s()) {
            (ServiceManager::Systemd, _) => format!("/etc/sysconfig/{}", self.service()),
            (ServiceManager::OpenRc, true) => format!("/etc/rancher/k3s/{}.env", self.service()),
            (ServiceManager::OpenRc, false) => format!("/etc/k0s/{}.env", self.service()),
        }
    }

    pub fn unit_file(self, sm: ServiceManager) -> String {
        match sm {
            ServiceManager::Systemd => format!(
                "/etc/systemd/system/{}.service.d/override.conf",
                self.service()
            ),
            ServiceManager::OpenRc => format!("/etc/init.d/{}", self.service()),
        }
    }
}

/// The four blocks of a config, as they were read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Blocks {
    pub k3s: Option<K8sDistro>,
    pub k3s_agent: Option<K8sDistro>,
    pub k0s: Option<K8sDistro>,
    pub k0s_worker: Option<K8sDistro>,
}

impl Blocks {
    pub fn from_config(cfg: &Config) -> Blocks {
        Blocks {
            k3s: cfg.k3s.clone(),
            k3s_agent: cfg.k3s_agent.clone(),
            k0s: cfg.k0s.clone(),
            k0s_worker: cfg.k0s_worker.clone(),
        }
    }

    pub fn get(&self, kind: Kind) -> Option<&K8sDistro> {
        match kind {
            Kind::K3sServer => self.k3s.as_ref(),
            Kind::K3sAgent => self.k3s_agent.as_ref(),
            Kind::K0sController => self.k0s.as_ref(),
            Kind::K0sWorker => self.k0s_worker.as_ref(),
        }
    }

    /// The block that is enabled, if one is.
    pub fn enabled(&self) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| self.get(*k).is_some_and(|b| b.enabled.0))
    }
}

/// A file to write, by absolute path inside the node's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub path: String,
    pub content: String,
    pub mode: u32,
}

/// What to do to the root: write, remove (if present), enable and disable services.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub write: Vec<File>,
    pub remove: Vec<String>,
    pub enable: Vec<&'static str>,
    pub disable: Vec<&'static str>,
}

/// What a role adds before the user's env and args (the join URL and token of a worker,
/// `--cluster-init` of the first HA master, `--flannel-iface=edgevpn0`, …). Empty for a
/// single node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extra {
    pub env: BTreeMap<String, String>,
    pub args: Vec<String>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ClusterError {
    #[error(
        "`{a}.enabled` and `{b}.enabled` are both true: a node runs one Kubernetes service; set one of them to false"
    )]
    Conflict { a: &'static str, b: &'static str },
    #[error(
        "{key}.env: {name:?} is not a variable name (letters, digits and `_`, not starting with a digit)"
    )]
    EnvName { key: &'static str, name: String },
    #[error(
        "{key}.env.{name}: a value cannot hold a newline or NUL; put the text in a file and pass its path"
    )]
    EnvValue { key: &'static str, name: String },
    #[error("{key}.args: {arg:?} cannot go into the service: {why}")]
    Arg {
        key: &'static str,
        arg: String,
        why: &'static str,
    },
}

/// godotenv's `Marshal`: one `KEY=value` line per key, sorted; an integer bare, anything else
/// in double quotes with `\`, `"`, `!`, `$` and `` ` `` escaped.
pub fn dotenv(env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for (k, v) in env {
        if v.parse::<i64>().is_ok() {
            out.push_str(&format!("{k}={v}\n"));
            continue;
        }
        let mut q = String::with_capacity(v.len() + 2);
        for c in v.chars() {
            if matches!(c, '\\' | '"' | '!' | '$' | '`') {
                q.push('\\');
            }
            q.push(c);
        }
        out.push_str(&format!("{k}=\"{q}\"\n"));
    }
    out
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The env and args of `kind` from its block over the role's `extra`, checked.
pub fn command(
    kind: Kind,
    block: &K8sDistro,
    extra: &Extra,
    sm: ServiceManager,
) -> Result<(BTreeMap<String, String>, Vec<String>), ClusterError> {
    let key = kind.key();
    let mut env = if block.replace_env.0 {
        BTreeMap::new()
    } else {
        extra.env.clone()
    };
    for (name, value) in &block.env {
        if !valid_name(name) {
            return Err(ClusterError::EnvName {
                key,
                name: name.clone(),
            });
        }
        if value.0.contains(['\n', '\r', '\0']) {
            return Err(ClusterError::EnvValue {
                key,
                name: name.clone(),
            });
        }
        env.insert(name.clone(), value.0.clone());
    }
    let mut args = Vec::new();
    if !block.replace_args.0 {
        args.extend(extra.args.iter().cloned());
        if block.embedded_registry.0 && kind == Kind::K3sServer {
            args.push("--embedded-registry".to_string());
        }
    }
    args.extend(block.args.iter().cloned());
    for arg in &args {
        let why = if arg.contains(['\n', '\r', '\0']) {
            Some("a newline or NUL would end the command line")
        } else if sm == ServiceManager::OpenRc && arg.contains(['"', '`', '$', '\\']) {
            Some(
                "OpenRC evaluates command_args in a shell; `\"`, `` ` ``, `$` and `\\` are refused",
            )
        } else {
            None
        };
        if let Some(why) = why {
            return Err(ClusterError::Arg {
                key,
                arg: arg.clone(),
                why,
            });
        }
    }
    Ok((env, args))
}

/// The service definition of `kind` running `args`.
pub fn unit(kind: Kind, args: &[String], sm: ServiceManager) -> String {
    let mut line = format!("{} {}", kind.binary(), kind.subcommand());
    for a in args {
        line.push(' ');
        line.push_str(a);
    }
    let head = format!(
        "Written by kairos-agent from the cloud-config's `{}:` block; rewritten at every boot.",
        kind.key()
    );
    match sm {
        ServiceManager::Systemd => format!(
            "# {head}\n[Service]\nEnvironmentFile=-{}\nExecStart=\nExecStart={line}\n",
            kind.env_file(sm)
        ),
        ServiceManager::OpenRc => {
            let svc = kind.service();
            let command_args = line
                .split_once(' ')
                .map(|(_, rest)| rest)
                .unwrap_or_default();
            format!(
                "#!/sbin/openrc-run\n# {head}\n\ndescription=\"{svc}: Kubernetes ({key})\"\nsupervisor=supervise-daemon\ncommand={bin}\ncommand_args=\"{command_args}\"\noutput_log=/var/log/{svc}.log\nerror_log=/var/log/{svc}.log\npidfile=/var/run/{svc}.pid\nrespawn_delay=5\nrespawn_max=0\n\ndepend() {{\n    after network-online\n    want cgroups\n}}\n\nset -o allexport\n[ -f /etc/environment ] && . /etc/environment\n[ -f {env} ] && . {env}\nset +o allexport\n",
                key = kind.key(),
                bin = kind.binary(),
                env = kind.env_file(sm),
            )
        }
    }
}

/// The plan for a node from its config: the enabled block's files and service, every other
/// block's files removed and service disabled. `extra` is what the node's role adds to the
/// enabled block (see [`Extra`]).
pub fn plan(blocks: &Blocks, sm: ServiceManager, extra: &Extra) -> Result<Plan, ClusterError> {
    let enabled: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|k| blocks.get(*k).is_some_and(|b| b.enabled.0))
        .collect();
    if let [a, b, ..] = enabled[..] {
        return Err(ClusterError::Conflict {
            a: a.key(),
            b: b.key(),
        });
    }
    let chosen = enabled
        .first()
        .and_then(|k| Some((*k, blocks.get(*k)?.clone())));
    plan_with(chosen, sm, extra)
}

/// The plan for a node whose role over the mesh runs `kind` (the server for a master, the
/// agent for a worker): that block's env and args over the role's `extra` — the block need
/// not be enabled, nor even present, as in provider-kairos — and every other block removed.
pub fn plan_role(
    blocks: &Blocks,
    kind: Kind,
    sm: ServiceManager,
    extra: &Extra,
) -> Result<Plan, ClusterError> {
    let block = blocks.get(kind).cloned().unwrap_or_default();
    plan_with(Some((kind, block)), sm, extra)
}

fn plan_with(
    chosen: Option<(Kind, K8sDistro)>,
    sm: ServiceManager,
    extra: &Extra,
) -> Result<Plan, ClusterError> {
    let mut plan = Plan::default();
    for kind in Kind::ALL {
        match chosen.as_ref().filter(|(k, _)| *k == kind) {
            Some((_, block)) => {
                let (env, args) = command(kind, block, extra, sm)?;
                plan.write.push(File {
                    path: kind.env_file(sm),
                    content: dotenv(&env),
                    mode: 0o600, // it holds join tokens
                });
                plan.write.push(File {
                    path: kind.unit_file(sm),
                    content: unit(kind, &args, sm),
                    mode: match sm {
                        ServiceManager::Systemd => 0o644,
                        ServiceManager::OpenRc => 0o755,
                    },
                });
                plan.enable.push(kind.service());
            }
            None => {
                plan.remove.push(kind.env_file(sm));
                plan.remove.push(kind.unit_file(sm));
                plan.disable.push(kind.service());
            }
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> Blocks {
        let v = kairos_config::yaml::parse(yaml, &std::sync::Arc::from("test.yaml"))
            .unwrap()
            .to_json();
        Blocks::from_config(&serde_json::from_value::<Config>(v).unwrap())
    }

    fn plan_of(yaml: &str, sm: ServiceManager) -> Result<Plan, ClusterError> {
        plan(&cfg(yaml), sm, &Extra::default())
    }

    /// `k3s-agent`'s env and args on systemd, over `extra`.
    fn agent_command(
        yaml: &str,
        extra: &Extra,
    ) -> Result<(BTreeMap<String, String>, Vec<String>), ClusterError> {
        let c = cfg(yaml);
        command(
            Kind::K3sAgent,
            c.k3s_agent.as_ref().unwrap(),
            extra,
            ServiceManager::Systemd,
        )
    }

    fn file<'a>(p: &'a Plan, path: &str) -> &'a str {
        &p.write
            .iter()
            .find(|f| f.path == path)
            .unwrap_or_else(|| panic!("{path} in {p:#?}"))
            .content
    }

    #[test]
    fn k3s_server_on_systemd() {
        let c = cfg(
            "k3s:\n  enabled: true\n  args: [--disable=traefik, --node-label=zone=a]\n  env:\n    K3S_NODE_NAME: node-1\n    K3S_KUBECONFIG_MODE: 644\n",
        );
        let p = plan(&c, ServiceManager::Systemd, &Extra::default()).unwrap();
        assert_eq!(
            file(&p, "/etc/sysconfig/k3s"),
            "K3S_KUBECONFIG_MODE=644\nK3S_NODE_NAME=\"node-1\"\n"
        );
        assert_eq!(
            file(&p, "/etc/systemd/system/k3s.service.d/override.conf"),
            "# Written by kairos-agent from the cloud-config's `k3s:` block; rewritten at every boot.\n[Service]\nEnvironmentFile=-/etc/sysconfig/k3s\nExecStart=\nExecStart=/usr/bin/k3s server --disable=traefik --node-label=zone=a\n"
        );
        assert_eq!(p.enable, ["k3s"]);
        assert_eq!(p.disable, ["k3s-agent", "k0scontroller", "k0sworker"]);
        assert!(p.remove.contains(&"/etc/sysconfig/k3s-agent".to_string()));
        assert!(!p.remove.contains(&"/etc/sysconfig/k3s".to_string()));
    }

    #[test]
    fn role_args_come_first_and_replace_drops_them() {
        let extra = Extra {
            env: [
                ("K3S_URL".to_string(), "https://10.1.0.1:6443".to_string()),
                ("K3S_TOKEN".to_string(), "K10abc::server:x".to_string()),
            ]
            .into(),
            args: vec!["--with-node-id".into(), "--flannel-iface=edgevpn0".into()],
        };
        let (env, args) = agent_command(
            "k3s-agent:\n  enabled: true\n  args: [--node-label=a=b]\n  env: {K3S_TOKEN: mine}\n",
            &extra,
        )
        .unwrap();
        assert_eq!(env["K3S_TOKEN"], "mine", "the user's env wins");
        assert_eq!(env["K3S_URL"], "https://10.1.0.1:6443");
        assert_eq!(
            args,
            [
                "--with-node-id",
                "--flannel-iface=edgevpn0",
                "--node-label=a=b"
            ]
        );
        let (env, args) = agent_command("k3s-agent:\n  enabled: true\n  replace_args: true\n  replace_env: true\n  args: [--only]\n  env: {A: b}\n", &extra).unwrap();
        assert_eq!(env.keys().collect::<Vec<_>>(), ["A"]);
        assert_eq!(args, ["--only"]);
    }

    #[test]
    fn embedded_registry_is_a_server_arg_before_the_users() {
        let c = cfg("k3s:\n  enabled: true\n  embedded_registry: true\n  args: [--x]\n");
        let p = plan(&c, ServiceManager::Systemd, &Extra::default()).unwrap();
        assert!(
            file(&p, "/etc/systemd/system/k3s.service.d/override.conf")
                .contains("ExecStart=/usr/bin/k3s server --embedded-registry --x\n")
        );
        let c = cfg("k3s:\n  enabled: true\n  embedded_registry: true\n  replace_args: true\n");
        let p = plan(&c, ServiceManager::Systemd, &Extra::default()).unwrap();
        assert!(
            file(&p, "/etc/systemd/system/k3s.service.d/override.conf")
                .ends_with("ExecStart=/usr/bin/k3s server\n")
        );
    }

    #[test]
    fn k0s_and_openrc_paths() {
        let c = cfg("k0s-worker:\n  enabled: true\n  args: [--labels=a=b]\n");
        let p = plan(&c, ServiceManager::OpenRc, &Extra::default()).unwrap();
        let init = file(&p, "/etc/init.d/k0sworker");
        assert!(init.starts_with("#!/sbin/openrc-run\n"), "{init}");
        assert!(init.contains("command=/usr/bin/k0s\ncommand_args=\"worker --labels=a=b\"\n"));
        assert!(init.contains("[ -f /etc/k0s/k0sworker.env ] && . /etc/k0s/k0sworker.env\n"));
        assert_eq!(file(&p, "/etc/k0s/k0sworker.env"), "");
        assert_eq!(p.enable, ["k0sworker"]);
        let c = cfg("k3s:\n  enabled: true\n");
        let p = plan(&c, ServiceManager::OpenRc, &Extra::default()).unwrap();
        assert!(file(&p, "/etc/init.d/k3s").contains("command_args=\"server\""));
        assert_eq!(file(&p, "/etc/rancher/k3s/k3s.env"), "");
        assert_eq!(
            p.write
                .iter()
                .find(|f| f.path == "/etc/init.d/k3s")
                .unwrap()
                .mode,
            0o755
        );
    }

    #[test]
    fn nothing_enabled_removes_everything() {
        for yaml in ["{}\n", "k3s:\n  enabled: false\n  args: [--x]\n"] {
            let p = plan_of(yaml, ServiceManager::Systemd).unwrap();
            assert!(p.write.is_empty() && p.enable.is_empty());
            assert_eq!(p.disable.len(), 4);
            assert!(
                p.remove
                    .contains(&"/etc/systemd/system/k3s.service.d/override.conf".to_string())
            );
        }
    }

    #[test]
    fn refusals_name_the_key() {
        let e = plan_of(
            "k3s: {enabled: true}\nk3s-agent: {enabled: true}\n",
            ServiceManager::Systemd,
        )
        .unwrap_err();
        assert_eq!(
            e,
            ClusterError::Conflict {
                a: "k3s",
                b: "k3s-agent"
            }
        );
        assert!(e.to_string().contains("set one of them to false"));
        let e = plan_of(
            "k3s:\n  enabled: true\n  env: {\"BAD-NAME\": x}\n",
            ServiceManager::Systemd,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("k3s.env: \"BAD-NAME\""), "{e}");
        let e = plan_of(
            "k3s:\n  enabled: true\n  env: {A: \"x\\nExecStartPre=/bin/evil\"}\n",
            ServiceManager::Systemd,
        )
        .unwrap_err();
        assert_eq!(
            e,
            ClusterError::EnvValue {
                key: "k3s",
                name: "A".into()
            }
        );
        let e = plan_of(
            "k3s:\n  enabled: true\n  args: [\"--a\\nExecStartPre=/bin/evil\"]\n",
            ServiceManager::Systemd,
        )
        .unwrap_err();
        assert!(matches!(e, ClusterError::Arg { key: "k3s", .. }), "{e}");
        let e = plan_of(
            "k3s:\n  enabled: true\n  args: [\"--name=$(reboot)\"]\n",
            ServiceManager::OpenRc,
        )
        .unwrap_err();
        assert!(e.to_string().contains("OpenRC"), "{e}");
        // systemd expands `$VAR` itself, as for Go Kairos users: allowed there.
        assert!(
            plan_of(
                "k3s:\n  enabled: true\n  args: [\"--node-name=$HOSTNAME\"]\n",
                ServiceManager::Systemd
            )
            .is_ok()
        );
    }

    #[test]
    fn dotenv_quotes_as_godotenv() {
        let env: BTreeMap<String, String> = [
            ("N".to_string(), "42".to_string()),
            ("S".to_string(), "a \"b\" $c `d` !e \\f".to_string()),
            ("E".to_string(), String::new()),
        ]
        .into();
        assert_eq!(
            dotenv(&env),
            "E=\"\"\nN=42\nS=\"a \\\"b\\\" \\$c \\`d\\` \\!e \\\\f\"\n"
        );
    }
}
