//! `config_url` chains and `kairos.config_url` stages over real HTTP on loopback.

mod common;

use std::collections::HashMap;
use std::fs;
use std::sync::{Arc, Mutex};

/// Fixed pages on loopback; records every path requested.
struct Server {
    base: String,
    hits: Arc<Mutex<Vec<String>>>,
}

fn serve(pages: HashMap<&'static str, String>) -> Server {
    let hits = Arc::new(Mutex::new(Vec::new()));
    let h = hits.clone();
    let base = common::serve(move |r| {
        h.lock().unwrap().push(r.path.clone());
        match pages.get(r.path.as_str()) {
            Some(body) => (200, body.clone().into_bytes()),
            None => (404, Vec::new()),
        }
    });
    Server { base, hits }
}

fn agent(args: &[&str]) -> (i32, String, String) {
    common::agent(args, &[])
}

#[test]
fn config_url_chain_over_http() {
    // Two servers: the file points at srv2's page, which points at srv's.
    let srv = serve(HashMap::from([(
        "/two.yaml",
        "#cloud-config\ninstall:\n  device: /dev/sdq\n".to_string(),
    )]));
    let d = tempfile::tempdir().unwrap();
    fs::create_dir_all(d.path().join("oem")).unwrap();
    let srv2 = serve(HashMap::from([(
        "/one.yaml",
        format!(
            "#cloud-config\nhostname: from-url\nconfig_url: {}/two.yaml\n",
            srv.base
        ),
    )]));
    fs::write(
        d.path().join("oem/a.yaml"),
        format!(
            "#cloud-config\nhostname: from-file\nconfig_url: {}/one.yaml\n",
            srv2.base
        ),
    )
    .unwrap();
    let (code, out, err) = agent(&[
        "config",
        "show",
        "--json",
        "--root",
        d.path().to_str().unwrap(),
        "--cmdline",
        "",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["config"]["hostname"], "from-url",
        "fetched values win over the referencing file"
    );
    assert_eq!(v["config"]["install"]["device"], "/dev/sdq");
    let sources: Vec<&str> = v["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(
        sources,
        vec![
            "/oem/a.yaml".to_string(),
            format!("{}/two.yaml", srv.base),
            format!("{}/one.yaml", srv2.base)
        ]
    );
    assert_eq!(srv.hits.lock().unwrap().as_slice(), ["/two.yaml"]);
}

#[test]
fn cmdline_config_url_stages_run_and_404_is_a_warning() {
    let srv = serve(HashMap::from([(
        "/stages.yaml",
        "#cloud-config\nstages:\n  boot:\n  - files: [{path: /from-url, content: yes}]\nwrite_files:\n- {path: /wf, content: w, permissions: '0600'}\n".to_string(),
    )]));
    let d = tempfile::tempdir().unwrap();
    let root = d.path().to_str().unwrap();
    let cmdline = format!("kairos.config_url={}/stages.yaml", srv.base);
    let (code, _, err) = agent(&["run-stage", "boot", "--root", root, "--cmdline", &cmdline]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        fs::read_to_string(d.path().join("from-url")).unwrap(),
        "yes"
    );
    assert_eq!(fs::read_to_string(d.path().join("wf")).unwrap(), "w");
    assert!(
        err.contains(&format!("boot from {}/stages.yaml", srv.base)),
        "{err}"
    );

    // A missing page is retried, then reported, and the config still loads.
    fs::create_dir_all(d.path().join("oem")).unwrap();
    fs::write(
        d.path().join("oem/a.yaml"),
        format!(
            "#cloud-config\nconfig_url: {}/missing.yaml\nhostname: h\n",
            srv.base
        ),
    )
    .unwrap();
    let (code, out, err) = agent(&["config", "get", "hostname", "--root", root, "--cmdline", ""]);
    assert_eq!((code, out.trim()), (0, "h"), "{err}");
    assert!(err.contains("HTTP status 404"), "{err}");
    let misses = srv
        .hits
        .lock()
        .unwrap()
        .iter()
        .filter(|p| *p == "/missing.yaml")
        .count();
    assert_eq!(misses, 3, "Kairos retries a config_url three times");
}
