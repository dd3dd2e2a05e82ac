//! kube-vip on the masters (`kubevip:` block, A.14.4 step 7): a virtual IP (`kubevip.eip`)
//! that the control plane answers on, moved between masters by kube-vip's leader election
//! over ARP. A master writes kube-vip's RBAC and its DaemonSet (or, with `static_pod: true`,
//! a static pod) where k3s picks them up; workers and the kubeconfig use the VIP instead of
//! one master's address.
//!
//! Pure: the files are rendered here; the agent writes them beneath the root with the rest
//! of the role's plan. Every value from the config is written as a quoted JSON string (YAML
//! reads JSON scalars), so no value can add a key or a document.

use std::net::Ipv4Addr;

use crate::single::File;

/// Where k3s deploys manifests from (the RBAC and the DaemonSet).
pub const MANIFEST_DIR: &str = "/var/lib/rancher/k3s/server/manifests";
/// kube-vip's RBAC, as provider-kairos names it.
pub const RBAC_FILE: &str = "/var/lib/rancher/k3s/server/manifests/kubevipmanifest.yaml";
/// The DaemonSet.
pub const DAEMONSET_FILE: &str = "/var/lib/rancher/k3s/server/manifests/kubevip.yaml";
/// The static pod (`static_pod: true`): the kubelet's pod-manifests directory under k3s.
pub const STATIC_POD_FILE: &str = "/var/lib/rancher/k3s/agent/pod-manifests/kubevip.yaml";
/// Every file this module may write (removed when the node is no longer a kube-vip master).
pub const ALL_FILES: [&str; 3] = [RBAC_FILE, DAEMONSET_FILE, STATIC_POD_FILE];

/// kube-vip's image when the config names none (provider-kairos' default).
pub const DEFAULT_IMAGE: &str = "ghcr.io/kube-vip/kube-vip";
pub const DEFAULT_VERSION: &str = "v1.2.3";

/// The `kubevip:` block, once it is known to be enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The virtual IP (`eip`).
    pub vip: Ipv4Addr,
    /// The interface kube-vip announces the VIP on (`interface`); the agent falls back to
    /// the node's first non-loopback interface when the config names none.
    pub interface: Option<String>,
    pub static_pod: bool,
    /// `image:version`.
    pub image: String,
    /// `manifest_url` was set: provider-kairos downloads the RBAC from it; this node writes
    /// its own (the agent says so in `p2p status`).
    pub manifest_url: Option<String>,
}

/// Why a `kubevip:` block cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeVipError {
    #[error(
        "kubevip.eip: {0:?} is not an IPv4 address (kube-vip needs the virtual IP the API answers on, e.g. 192.168.1.240)"
    )]
    BadEip(String),
    #[error("kubevip.enable is true but kubevip.eip is empty: set the virtual IP")]
    NoEip,
    #[error(
        "kubevip.{key}: {value:?} has characters an interface name or image reference cannot have"
    )]
    BadValue { key: &'static str, value: String },
}

impl Spec {
    /// From the config: `None` when kube-vip is off (`enable` false, or unset with no `eip`:
    /// provider-kairos' `IsEnabled`).
    pub fn from_config(k: &kairos_config::types::KubeVip) -> Result<Option<Spec>, KubeVipError> {
        let eip = set(&k.eip).unwrap_or_default();
        let on = match &k.enable {
            Some(e) => e.0,
            None => !eip.is_empty(),
        };
        if !on {
            return Ok(None);
        }
        if eip.is_empty() {
            return Err(KubeVipError::NoEip);
        }
        let vip = eip
            .parse()
            .map_err(|_| KubeVipError::BadEip(eip.to_string()))?;
        let interface = set(&k.interface)
            .map(|i| checked("interface", i, is_iface))
            .transpose()?;
        let base = set(&k.image).unwrap_or(DEFAULT_IMAGE);
        let version = set(&k.version).unwrap_or(DEFAULT_VERSION);
        // An image that already names a tag or digest keeps it.
        let tagged = base.contains('@') || base.rsplit('/').next().is_some_and(|l| l.contains(':'));
        let image = if tagged {
            base.to_string()
        } else {
            format!("{base}:{version}")
        };
        let image = checked("image", &image, is_image_ref)?;
        Ok(Some(Spec {
            vip,
            interface,
            static_pod: k.static_pod.0,
            image,
            manifest_url: k.manifest_url.clone().filter(|u| !u.trim().is_empty()),
        }))
    }
}

/// A key's value when set and not blank.
fn set(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn checked(key: &'static str, v: &str, ok: fn(&str) -> bool) -> Result<String, KubeVipError> {
    if ok(v) {
        Ok(v.to_string())
    } else {
        Err(KubeVipError::BadValue {
            key,
            value: v.chars().take(80).collect(),
        })
    }
}

/// A Linux interface name: 1–15 bytes, no `/`, whitespace or control characters.
fn is_iface(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// An OCI image reference's characters (name, tag, digest).
fn is_image_ref(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
}

/// A quoted YAML scalar.
fn q(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// kube-vip's service account, cluster role and binding.
pub fn rbac() -> String {
    "\
apiVersion: v1
kind: ServiceAccount
metadata:
  name: kube-vip
  namespace: kube-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:kube-vip-role
rules:
- apiGroups: [\"\"]
  resources: [\"services/status\"]
  verbs: [\"update\"]
- apiGroups: [\"\"]
  resources: [\"services\", \"endpoints\"]
  verbs: [\"list\", \"get\", \"watch\", \"update\"]
- apiGroups: [\"\"]
  resources: [\"nodes\"]
  verbs: [\"list\", \"get\", \"watch\", \"update\", \"patch\"]
- apiGroups: [\"coordination.k8s.io\"]
  resources: [\"leases\"]
  verbs: [\"list\", \"get\", \"watch\", \"update\", \"create\"]
- apiGroups: [\"discovery.k8s.io\"]
  resources: [\"endpointslices\"]
  verbs: [\"list\", \"get\", \"watch\", \"update\"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: system:kube-vip-binding
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:kube-vip-role
subjects:
- kind: ServiceAccount
  name: kube-vip
  namespace: kube-system
"
    .to_string()
}

/// kube-vip's pod spec body (containers and host settings), indented by `ind` spaces.
fn pod_spec(s: &Spec, iface: &str, ind: usize, service_account: bool) -> String {
    let env = [
        ("vip_arp", "true".to_string()),
        ("port", "6443".to_string()),
        ("vip_interface", iface.to_string()),
        ("vip_subnet", "32".to_string()),
        ("cp_enable", "true".to_string()),
        ("cp_namespace", "kube-system".to_string()),
        ("vip_leaderelection", "true".to_string()),
        ("vip_leaseduration", "5".to_string()),
        ("vip_renewdeadline", "3".to_string()),
        ("vip_retryperiod", "1".to_string()),
        ("address", s.vip.to_string()),
        ("prometheus_server", ":2112".to_string()),
    ];
    let mut out = String::new();
    let mut line = |l: &str| {
        out.push_str(&" ".repeat(ind));
        out.push_str(l);
        out.push('\n');
    };
    line("containers:");
    line("- name: kube-vip");
    line(&format!("  image: {}", q(&s.image)));
    line("  imagePullPolicy: IfNotPresent");
    line("  args: [\"manager\"]");
    line("  env:");
    for (k, v) in env {
        line(&format!("  - name: {k}"));
        line(&format!("    value: {}", q(&v)));
    }
    line("  securityContext:");
    line("    capabilities:");
    line("      add: [\"NET_ADMIN\", \"NET_RAW\"]");
    line("hostNetwork: true");
    if service_account {
        line("serviceAccountName: kube-vip");
    }
    line("tolerations:");
    line("- effect: NoSchedule");
    line("  operator: Exists");
    line("- effect: NoExecute");
    line("  operator: Exists");
    out
}

/// The DaemonSet: one kube-vip per control-plane node.
pub fn daemonset(s: &Spec, iface: &str) -> String {
    format!(
        "\
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: kube-vip-ds
  namespace: kube-system
  labels:
    app.kubernetes.io/name: kube-vip-ds
spec:
  selector:
    matchLabels:
      app.kubernetes.io/name: kube-vip-ds
  template:
    metadata:
      labels:
        app.kubernetes.io/name: kube-vip-ds
    spec:
      affinity:
        nodeAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            nodeSelectorTerms:
            - matchExpressions:
              - key: node-role.kubernetes.io/master
                operator: Exists
            - matchExpressions:
              - key: node-role.kubernetes.io/control-plane
                operator: Exists
{}",
        pod_spec(s, iface, 6, true)
    )
}

/// The static pod (the kubelet runs it before the API is up).
pub fn static_pod(s: &Spec, iface: &str) -> String {
    format!(
        "\
apiVersion: v1
kind: Pod
metadata:
  name: kube-vip
  namespace: kube-system
spec:
{}",
        pod_spec(s, iface, 2, false)
    )
}

/// The files a master writes for `s`, announcing on `iface`.
pub fn files(s: &Spec, iface: &str) -> Vec<File> {
    let mut out = vec![File {
        path: RBAC_FILE.into(),
        content: rbac(),
        mode: 0o644,
    }];
    if s.static_pod {
        out.push(File {
            path: STATIC_POD_FILE.into(),
            content: static_pod(s, iface),
            mode: 0o644,
        });
    } else {
        out.push(File {
            path: DAEMONSET_FILE.into(),
            content: daemonset(s, iface),
            mode: 0o644,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> Result<Option<Spec>, KubeVipError> {
        let v = kairos_config::yaml::parse(yaml, &std::sync::Arc::from("t.yaml"))
            .unwrap()
            .to_json();
        let k: kairos_config::types::KubeVip = serde_json::from_value(v).unwrap();
        Spec::from_config(&k)
    }

    #[test]
    fn enabled_as_provider_kairos_decides() {
        assert_eq!(spec("eip: ''\n").unwrap(), None);
        assert_eq!(spec("interface: eth0\n").unwrap(), None);
        assert_eq!(spec("eip: 10.0.0.9\nenable: false\n").unwrap(), None);
        let s = spec("eip: 10.0.0.9\n").unwrap().unwrap();
        assert_eq!(s.vip, Ipv4Addr::new(10, 0, 0, 9));
        assert_eq!(s.image, "ghcr.io/kube-vip/kube-vip:v1.2.3");
        assert!(!s.static_pod);
        assert_eq!(spec("enable: true\n"), Err(KubeVipError::NoEip));
        assert!(matches!(
            spec("eip: 10.0.0.300\n"),
            Err(KubeVipError::BadEip(_))
        ));
    }

    #[test]
    fn image_and_version() {
        let s = spec("eip: 10.0.0.9\nversion: v0.8.0\n").unwrap().unwrap();
        assert_eq!(s.image, "ghcr.io/kube-vip/kube-vip:v0.8.0");
        let s = spec("eip: 10.0.0.9\nimage: reg:5000/me/vip\nversion: v1\n")
            .unwrap()
            .unwrap();
        assert_eq!(s.image, "reg:5000/me/vip:v1");
        let s = spec("eip: 10.0.0.9\nimage: reg:5000/me/vip:mine\n")
            .unwrap()
            .unwrap();
        assert_eq!(s.image, "reg:5000/me/vip:mine");
    }

    #[test]
    fn hostile_values_are_refused() {
        for y in [
            "eip: 10.0.0.9\ninterface: \"eth0\\n  evil: 1\"\n",
            "eip: 10.0.0.9\ninterface: ../../x\n",
            "eip: 10.0.0.9\ninterface: averyveryverylongname\n",
            "eip: 10.0.0.9\nimage: \"x\\\"\\nkind: Secret\"\n",
            "eip: 10.0.0.9\nimage: \"a b\"\n",
        ] {
            assert!(
                matches!(spec(y), Err(KubeVipError::BadValue { .. })),
                "{y}: {:?}",
                spec(y)
            );
        }
    }

    #[test]
    fn daemonset_has_the_vip_and_interface_and_parses() {
        let s = spec("eip: 192.168.1.240\ninterface: enp1s0\n")
            .unwrap()
            .unwrap();
        let f = files(&s, s.interface.as_deref().unwrap());
        assert_eq!(
            f.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
            [RBAC_FILE, DAEMONSET_FILE]
        );
        let ds = &f[1].content;
        let v = kairos_config::yaml::parse(ds, &std::sync::Arc::from("ds.yaml"))
            .unwrap()
            .to_json();
        assert_eq!(v["kind"], "DaemonSet");
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "ghcr.io/kube-vip/kube-vip:v1.2.3");
        let env: std::collections::BTreeMap<String, String> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_string(),
                    e["value"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(env["address"], "192.168.1.240");
        assert_eq!(env["vip_interface"], "enp1s0");
        assert_eq!(env["vip_leaderelection"], "true");
        assert_eq!(
            v["spec"]["template"]["spec"]["serviceAccountName"],
            "kube-vip"
        );
        // The RBAC is three documents; each parses.
        let docs: Vec<&str> = f[0].content.split("\n---\n").collect();
        assert_eq!(docs.len(), 3);
        for d in docs {
            kairos_config::yaml::parse(d, &std::sync::Arc::from("rbac.yaml")).unwrap();
        }
    }

    #[test]
    fn static_pod_goes_to_the_kubelet() {
        let s = spec("eip: 10.0.0.9\nstatic_pod: true\n").unwrap().unwrap();
        let f = files(&s, "eth0");
        assert_eq!(f[1].path, STATIC_POD_FILE);
        let v = kairos_config::yaml::parse(&f[1].content, &std::sync::Arc::from("p.yaml"))
            .unwrap()
            .to_json();
        assert_eq!(v["kind"], "Pod");
        assert_eq!(v["spec"]["hostNetwork"], true);
        assert_eq!(v["spec"]["containers"][0]["env"][2]["value"], "eth0");
    }
}
