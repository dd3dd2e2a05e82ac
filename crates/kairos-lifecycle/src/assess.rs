//! Boot assessment, the state machine that makes upgrades safe: a deployment booted with
//! tries left is blessed (its counter dropped) once the boot stage is done and the health
//! checks pass; a failing check is recorded and the node reboots, so systemd-boot counts the
//! try; once the tries are spent systemd-boot boots the passive entry, where the failure is
//! noticed and recorded for `state`. A blessed deployment is never rebooted by a check.

use std::fs;

use serde::Serialize;

use crate::entries::{self, Role};
use crate::history::{self, Record};
use crate::{Error, Node};

/// What the running system is, from the kernel cmdline and `/run/cos`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Booted {
    pub deployment: String,
    /// active, passive, recovery, live …
    pub mode: String,
}

impl Booted {
    pub fn from_cmdline(cmdline: &str) -> Booted {
        let get = |k: &str| {
            cmdline
                .split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_default()
                .to_string()
        };
        Booted {
            deployment: get("kairos.deployment="),
            mode: get("kairos.mode="),
        }
    }

    /// From the cmdline, the mode falling back to the marker immucore left in `run_cos`
    /// (`/run/cos/active_mode`…): a signed UKI's cmdline carries no mode, the boot entry's
    /// name gives it.
    pub fn detect(cmdline: &str, run_cos: &std::path::Path) -> Booted {
        let mut b = Booted::from_cmdline(cmdline);
        if b.mode.is_empty() {
            b.mode = ["active", "passive", "recovery", "live"]
                .into_iter()
                .find(|m| run_cos.join(format!("{m}_mode")).exists())
                .unwrap_or_default()
                .to_string();
        }
        b
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum Verdict {
    /// Under trial and healthy: the entry is blessed and stays the default.
    Blessed { deployment: String },
    /// Already blessed and healthy.
    Healthy { deployment: String },
    /// A check failed. `reboot` when the deployment is under trial (the caller reboots so
    /// the try is counted); a blessed one is only reported.
    Unhealthy {
        deployment: String,
        reason: String,
        reboot: bool,
    },
    /// Running the fallback because `failed` spent its tries.
    FellBack {
        failed: String,
        reason: String,
        running: String,
    },
    /// Recovery, live and netboot systems are not assessed.
    NotAssessed { mode: String },
}

/// Assesses the running boot; `checks` runs the health checks (Err = why one failed).
pub fn assess(
    node: &Node,
    booted: &Booted,
    checks: &mut dyn FnMut() -> Result<(), String>,
) -> Result<Verdict, Error> {
    let list = entries::list(&node.esp)?;
    let active = list.iter().find(|e| e.role == Role::Active);
    match booted.mode.as_str() {
        "active" => {
            let under_trial = active
                .filter(|e| e.deployment == booted.deployment)
                .filter(|e| e.tries.is_some());
            match (checks(), under_trial) {
                (Ok(()), Some(e)) => {
                    entries::bless(&node.esp, e)?;
                    history::append(
                        &node.store,
                        &Record::new("blessed", &booted.deployment, "", ""),
                    )?;
                    Ok(Verdict::Blessed {
                        deployment: booted.deployment.clone(),
                    })
                }
                (Ok(()), None) => Ok(Verdict::Healthy {
                    deployment: booted.deployment.clone(),
                }),
                (Err(reason), trial) => {
                    history::record_failure(
                        &node.store,
                        &Record::new("health-check-failed", &booted.deployment, "", &reason),
                    )?;
                    Ok(Verdict::Unhealthy {
                        deployment: booted.deployment.clone(),
                        reason,
                        // Even with no tries left (the last one is this boot): the reboot is
                        // what makes systemd-boot pass over the entry to the fallback.
                        reboot: trial.is_some(),
                    })
                }
            }
        }
        "passive" => {
            let Some(failed) = active.filter(|e| e.is_bad() && e.deployment != booted.deployment)
            else {
                return Ok(Verdict::Healthy {
                    deployment: booted.deployment.clone(),
                });
            };
            let reason = failure_reason(node, &failed.deployment);
            let seen = history::read(&node.store)
                .iter()
                .rev()
                .find(|r| r.action == "fell-back" || r.action == "activated")
                .is_some_and(|r| r.action == "fell-back" && r.deployment == failed.deployment);
            if !seen {
                history::append(
                    &node.store,
                    &Record::new("fell-back", &failed.deployment, "", &reason),
                )?;
            }
            Ok(Verdict::FellBack {
                failed: failed.deployment.clone(),
                reason,
                running: booted.deployment.clone(),
            })
        }
        other => Ok(Verdict::NotAssessed { mode: other.into() }),
    }
}

/// Why `deployment` failed, from the newest record that says: a failed health check, or the
/// failure summary kairos-immucore left on OEM.
pub fn failure_reason(node: &Node, deployment: &str) -> String {
    let check = history::failures(&node.store)
        .into_iter()
        .rev()
        .find(|r| r.deployment == deployment);
    let early = node
        .oem
        .as_ref()
        .and_then(|o| fs::read_to_string(o.join(crate::state::BOOT_FAILURE_LOG)).ok())
        .filter(|t| t.contains(deployment));
    match (check, early) {
        (_, Some(log)) => {
            let summary: Vec<&str> = log
                .lines()
                .filter(|l| !l.trim().is_empty())
                .take(3)
                .collect();
            format!("boot failed before userspace: {}", summary.join(" / "))
        }
        (Some(r), None) => format!("health check failed: {}", r.detail),
        (None, None) => "spent its boot tries without passing boot assessment (no record: the boot never reached it)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entries::{Target, render, set};

    fn node(d: &std::path::Path) -> Node {
        Node {
            store: d.join("state"),
            esp: d.join("esp"),
            oem: Some(d.join("oem")),
            scratch: d.join("scratch"),
            tools_root: "/".into(),
        }
    }

    fn entry(role: Role, dep: &str) -> String {
        render(
            role,
            &Target {
                deployment: dep,
                version: "",
                linux: "/k",
                initrd: "/i",
                cmdline: "",
            },
        )
    }

    fn booted(dep: &str, mode: &str) -> Booted {
        Booted::from_cmdline(&format!(
            "console=ttyS0 kairos.deployment={dep} kairos.mode={mode}"
        ))
    }

    #[test]
    fn mode_from_the_marker_when_the_cmdline_has_none() {
        let d = tempfile::tempdir().unwrap();
        let b = Booted::detect("kairos.deployment=d-1 rd.kairos.layers=x", d.path());
        assert_eq!((b.deployment.as_str(), b.mode.as_str()), ("d-1", ""));
        std::fs::write(d.path().join("passive_mode"), "1").unwrap();
        assert_eq!(
            Booted::detect("kairos.deployment=d-1", d.path()).mode,
            "passive"
        );
        // The cmdline wins.
        let b = Booted::detect("kairos.deployment=d-1 kairos.mode=recovery", d.path());
        assert_eq!(b.mode, "recovery");
    }

    #[test]
    fn trial_boot_is_blessed_only_when_checks_pass() {
        let d = tempfile::tempdir().unwrap();
        let n = node(d.path());
        set(&n.esp, Role::Passive, &entry(Role::Passive, "v1"), None).unwrap();
        set(&n.esp, Role::Active, &entry(Role::Active, "v2"), Some(3)).unwrap();
        let v = assess(&n, &booted("v2", "active"), &mut || {
            Err("curl exited 7".into())
        })
        .unwrap();
        assert_eq!(
            v,
            Verdict::Unhealthy {
                deployment: "v2".into(),
                reason: "curl exited 7".into(),
                reboot: true
            }
        );
        assert_eq!(entries::list(&n.esp).unwrap()[0].file, "active+3.conf");
        // The last try failing still reboots, so that the fallback boots.
        let dir = n.esp.join("loader/entries");
        fs::rename(dir.join("active+3.conf"), dir.join("active+0-3.conf")).unwrap();
        let v = assess(&n, &booted("v2", "active"), &mut || Err("x".into())).unwrap();
        assert!(
            matches!(v, Verdict::Unhealthy { reboot: true, .. }),
            "{v:?}"
        );
        fs::rename(dir.join("active+0-3.conf"), dir.join("active+3.conf")).unwrap();
        let v = assess(&n, &booted("v2", "active"), &mut || Ok(())).unwrap();
        assert_eq!(
            v,
            Verdict::Blessed {
                deployment: "v2".into()
            }
        );
        assert_eq!(entries::list(&n.esp).unwrap()[0].file, "active.conf");
        // Blessed: a failing check no longer asks for a reboot.
        let v = assess(&n, &booted("v2", "active"), &mut || Err("x".into())).unwrap();
        assert!(matches!(v, Verdict::Unhealthy { reboot: false, .. }));
    }

    #[test]
    fn spent_deployment_is_reported_from_the_fallback_once() {
        let d = tempfile::tempdir().unwrap();
        let n = node(d.path());
        set(&n.esp, Role::Passive, &entry(Role::Passive, "v1"), None).unwrap();
        set(&n.esp, Role::Active, &entry(Role::Active, "v2"), Some(3)).unwrap();
        assess(&n, &booted("v2", "active"), &mut || {
            Err("exit status 1".into())
        })
        .unwrap();
        let dir = n.esp.join("loader/entries");
        fs::rename(dir.join("active+3.conf"), dir.join("active+0-3.conf")).unwrap();
        let v = assess(&n, &booted("v1", "passive"), &mut || Ok(())).unwrap();
        let Verdict::FellBack {
            failed,
            reason,
            running,
        } = v
        else {
            panic!("{v:?}")
        };
        assert_eq!((failed.as_str(), running.as_str()), ("v2", "v1"));
        assert!(reason.contains("exit status 1"), "{reason}");
        assess(&n, &booted("v1", "passive"), &mut || Ok(())).unwrap();
        let fell: Vec<_> = history::read(&n.store)
            .into_iter()
            .filter(|r| r.action == "fell-back")
            .collect();
        assert_eq!(fell.len(), 1);
    }

    #[test]
    fn early_boot_failure_is_the_reason() {
        let d = tempfile::tempdir().unwrap();
        let n = node(d.path());
        fs::create_dir_all(d.path().join("oem")).unwrap();
        fs::write(
            d.path().join("oem").join(crate::state::BOOT_FAILURE_LOG),
            "kairos-immucore: boot failed at step switch-root\ndeployment: v3  mode: active\n",
        )
        .unwrap();
        let r = failure_reason(&n, "v3");
        assert!(r.contains("switch-root"), "{r}");
        assert!(failure_reason(&n, "v9").contains("no record"));
        let v = assess(&n, &booted("r", "recovery"), &mut || Ok(())).unwrap();
        assert_eq!(
            v,
            Verdict::NotAssessed {
                mode: "recovery".into()
            }
        );
    }
}
