//! QR-code pairing (A.15): a node booted from the installer shows a fresh network token as a
//! QR code on its console (`kairos-agent pair`, `kairos-agent install --pair`); the operator
//! scans or types it into `kairosctl register --config cc.yaml TOKEN|--qr-code-image PNG`,
//! which sends the config over an ephemeral mesh (no VPN, no DHT: mDNS on the LAN or
//! `--bootstrap-peer`). The node takes the config as an overwrite (`/oem/99_pairing.yaml`)
//! and, with `install --pair`, installs with it.
//!
//! The exchange is go-nodepair's, on the ledger bucket `pairing`: the sender announces
//! `data` = the payload (`{"cc": <config text>, "device": …, "reboot": "", "poweroff": ""}`,
//! the last three only when set); the receiver answers `ok-<nonce>`; each side stops once it
//! has seen the other's key. The token is made for this one exchange, so only whoever sees
//! the console can send a config. The payload is bounded ([`MAX_PAYLOAD`]) and must be a
//! cloud-config (it is parsed before anything is written).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kairos_vpn::daemon::{Coordinator, Paths, TickInput, TickOutput};
use serde_json::json;

/// The ledger bucket of the exchange.
pub const BUCKET: &str = "pairing";
/// The sender's key.
pub const KEY_DATA: &str = "data";
/// The largest payload accepted (a cloud-config is a few KiB).
pub const MAX_PAYLOAD: usize = 64 << 10;
/// Where the received config goes (the last config dir read, so it wins).
pub const PAIRING_CONFIG: &str = "/oem/99_pairing.yaml";
/// Rotation of the pairing token's derived keys: longer than any pairing.
const TOKEN_INTERVAL: u64 = 3600;

/// What the sender sends: `cc` and, when set, `device`, `reboot`, `poweroff`.
pub type Payload = BTreeMap<String, String>;

/// The `p2p:` section of an ephemeral pairing node.
fn p2p(token: &str, bootstrap: &[String]) -> Result<kairos_config::types::P2p> {
    serde_json::from_value(json!({
        "network_token": token,
        "network_id": BUCKET,
        "disable_dht": true,
        "vpn": {"create": false},
        "bootstrap_peers": bootstrap,
    }))
    .context("the pairing node's settings")
}

/// Parses and checks a payload read from the ledger.
pub fn parse_payload(v: &str) -> Result<Payload> {
    if v.len() > MAX_PAYLOAD {
        bail!(
            "the pairing payload is {} bytes (at most {MAX_PAYLOAD})",
            v.len()
        );
    }
    let p: Payload =
        serde_json::from_str(v).context("the pairing payload is not a JSON map of strings")?;
    let cc = p
        .get("cc")
        .context("the pairing payload has no `cc` (the config)")?;
    if !kairos_config::collect::has_header(cc) {
        bail!("the config sent does not start with #cloud-config");
    }
    kairos_config::yaml::parse(cc, &std::sync::Arc::from("pairing"))
        .map_err(|e| anyhow::anyhow!("the config sent is not valid YAML: {e}"))?;
    Ok(p)
}

/// What a pairing side reports to its caller.
enum Event {
    Done(Result<Payload>),
    Daemon(String),
}

/// The receiving side's coordinator.
struct Receiver {
    nonce: String,
    got: Option<Payload>,
    tx: mpsc::Sender<Event>,
    error: Option<String>,
}

impl Coordinator for Receiver {
    fn bucket(&self) -> String {
        BUCKET.into()
    }

    fn tick(&mut self, input: TickInput) -> TickOutput {
        let mut writes = Vec::new();
        if self.got.is_none()
            && let Some(v) = input.entries.get(KEY_DATA)
        {
            match parse_payload(v) {
                Ok(p) => self.got = Some(p),
                Err(e) => {
                    if self.error.is_none() {
                        let _ = self.tx.send(Event::Done(Err(e.context("from the sender"))));
                    }
                    self.error = Some("refused a bad payload".into());
                }
            }
        }
        let ok_key = format!("ok-{}", self.nonce);
        if let Some(p) = &self.got {
            writes.push((ok_key.clone(), json!("ok").to_string()));
            // Our answer is in the ledger: the sender sees it too.
            if input.entries.contains_key(&ok_key) {
                let _ = self.tx.send(Event::Done(Ok(p.clone())));
            }
        }
        TickOutput {
            writes,
            status: json!({
                "role": "pairing (receiving)",
                "waiting": if self.got.is_none() { Some("waiting for `kairosctl register`") } else { None },
                "errors": self.error.iter().collect::<Vec<_>>(),
            }),
        }
    }
}

/// The sending side's coordinator.
struct Sender {
    payload: String,
    tx: mpsc::Sender<Event>,
    sent: Payload,
}

impl Coordinator for Sender {
    fn bucket(&self) -> String {
        BUCKET.into()
    }

    fn tick(&mut self, input: TickInput) -> TickOutput {
        if input.entries.keys().any(|k| k.starts_with("ok-")) {
            let _ = self.tx.send(Event::Done(Ok(self.sent.clone())));
        }
        TickOutput {
            writes: vec![(KEY_DATA.into(), self.payload.clone())],
            status: json!({"role": "pairing (sending)", "waiting": "waiting for the node's answer"}),
        }
    }
}

/// Runs an ephemeral mesh node with `coordinator` until it reports or `timeout` passes.
fn exchange(
    token: &str,
    bootstrap: &[String],
    timeout: Duration,
    make: impl FnOnce(mpsc::Sender<Event>) -> Box<dyn Coordinator>,
) -> Result<Payload> {
    let p2p = p2p(token, bootstrap)?;
    let (settings, _warnings) = kairos_vpn::settings::from_config(&p2p).map_err(|errors| {
        anyhow::anyhow!(
            "{}",
            errors
                .join("; ")
                .replace("p2p.network_token", "the pairing token")
        )
    })?;
    let dir = PathBuf::from(format!("/run/kairos/pairing-{}", std::process::id()));
    let dir = if std::fs::create_dir_all(&dir).is_ok() {
        dir
    } else {
        std::env::temp_dir().join(format!("kairos-pairing-{}", std::process::id()))
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let paths = Paths {
        state_dir: dir.clone(),
        socket: dir.join("p2p.sock"),
        resolv_conf: PathBuf::from("/dev/null"),
    };
    let (tx, rx) = mpsc::channel();
    let coordinator = make(tx.clone());
    let hostname = kairos_sys::host::hostname();
    std::thread::spawn(move || {
        let r = kairos_vpn::daemon::run(settings, hostname, paths, Some(coordinator));
        let _ = tx.send(Event::Daemon(match r {
            Ok(()) => "the mesh node stopped".into(),
            Err(e) => e.to_string(),
        }));
    });
    let r = match rx.recv_timeout(timeout) {
        Ok(Event::Done(r)) => r,
        Ok(Event::Daemon(e)) => Err(anyhow::anyhow!("pairing: {e}")),
        Err(_) => Err(anyhow::anyhow!(
            "no pairing within {} s: is the other side on the same LAN (mDNS) and using the same token?",
            timeout.as_secs()
        )),
    };
    // The identity was made for this exchange.
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// Receives a config with `token`; returns the payload (already checked).
pub fn receive(token: &str, bootstrap: &[String], timeout: Duration) -> Result<Payload> {
    let nonce = kairos_config::random_string(16);
    exchange(token, bootstrap, timeout, |tx| {
        Box::new(Receiver {
            nonce,
            got: None,
            tx,
            error: None,
        })
    })
}

/// Sends `payload` to the node showing `token`, until it answers.
pub fn send(token: &str, payload: &Payload, bootstrap: &[String], timeout: Duration) -> Result<()> {
    let text = serde_json::to_string(payload)?;
    // What the node would refuse is refused here, before any network.
    parse_payload(&text)?;
    exchange(token, bootstrap, timeout, |tx| {
        Box::new(Sender {
            payload: text,
            tx,
            sent: payload.clone(),
        })
    })
    .map(|_| ())
}

/// The payload `kairosctl register` sends: the config text and what its flags ask for.
pub fn payload(cc: String, device: Option<String>, reboot: bool, poweroff: bool) -> Payload {
    let mut p = Payload::new();
    p.insert("cc".into(), cc);
    if let Some(d) = device {
        p.insert("device".into(), d);
    }
    if reboot {
        p.insert("reboot".into(), String::new());
    }
    if poweroff {
        p.insert("poweroff".into(), String::new());
    }
    p
}

/// A token given on the command line, or `-`: read from stdin (at most 64 KiB), trimmed.
pub fn token_arg(arg: &str) -> Result<String> {
    if arg != "-" {
        return Ok(arg.trim().to_string());
    }
    let mut t = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(std::io::stdin(), 64 << 10), &mut t)
        .context("reading the token from stdin")?;
    Ok(t.trim().to_string())
}

/// A new pairing token (EdgeVPN's format).
pub fn new_token() -> String {
    kairos_mesh::Token::generate(TOKEN_INTERVAL).encode()
}

/// The QR code of `text` for a console: light modules as `█`, dark ones as blanks (a
/// console draws light on dark, a scanner wants dark on light), two rows per line, with a
/// light quiet zone around it. ECC level L keeps a token (≈ 400 characters) within 80 columns.
pub fn qr_text(text: &str) -> Result<String> {
    let code = qrcode::QrCode::with_error_correction_level(text.as_bytes(), qrcode::EcLevel::L)
        .context("making the QR code")?;
    let w = code.width();
    let colors = code.to_colors();
    // A quiet zone of 2 modules, or 1 where 2 would pass 80 columns (a 500-byte token).
    let quiet = if w + 4 <= 80 { 2usize } else { 1 };
    let size = w + 2 * quiet;
    let dark = |x: usize, y: usize| -> bool {
        if x < quiet || y < quiet || x >= quiet + w || y >= quiet + w {
            return false;
        }
        colors[(y - quiet) * w + (x - quiet)] == qrcode::Color::Dark
    };
    let mut out = String::new();
    for row in (0..size).step_by(2) {
        for x in 0..size {
            let top = !dark(x, row);
            let bottom = row + 1 < size && !dark(x, row + 1);
            out.push(match (top, bottom) {
                (true, true) => '█',
                (true, false) => '▀',
                (false, true) => '▄',
                (false, false) => ' ',
            });
        }
        out.push('\n');
    }
    Ok(out)
}

/// `kairos-agent pair`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct PairArgs {
    /// Use this token instead of a new one
    #[arg(long, hide_env_values = true)]
    pub token: Option<String>,
    /// Give up after this many seconds
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    /// A peer to dial (`/ip4/…/tcp/…/p2p/<id>`) besides mDNS; repeat for more
    #[arg(long = "bootstrap-peer", value_name = "MULTIADDR")]
    pub bootstrap_peers: Vec<String>,
}

/// Shows the QR code, receives the config and writes it to `/oem/99_pairing.yaml` under
/// `root` (mode 0600: it may hold secrets). Returns the payload.
pub fn pair(root: &Path, a: &PairArgs) -> Result<Payload> {
    let token = a.token.clone().unwrap_or_else(new_token);
    println!("Pair this node: scan the code below, or copy the token, and run");
    println!("  kairosctl register --config <your cloud-config> <token>");
    println!("{}", qr_text(&token)?);
    println!("token: {token}");
    println!("waiting for the config …");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let p = receive(&token, &a.bootstrap_peers, Duration::from_secs(a.timeout))?;
    let cc = &p["cc"];
    let r = kairos_sys::Root::new(root);
    let rel = PAIRING_CONFIG.trim_start_matches('/');
    r.create_parents(rel, 0o755)
        .and_then(|_| r.write_file(rel, cc.as_bytes(), 0o600))
        .with_context(|| format!("writing the received config to {PAIRING_CONFIG}"))?;
    println!("received a config ({} bytes): {PAIRING_CONFIG}", cc.len());
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_checked() {
        assert!(parse_payload(r##"{"cc":"#cloud-config\nhostname: a\n"}"##).is_ok());
        let e = parse_payload(r#"{"cc":"hostname: a\n"}"#).unwrap_err();
        assert!(e.to_string().contains("#cloud-config"), "{e}");
        let e = parse_payload(r#"{"device":"/dev/sda"}"#).unwrap_err();
        assert!(e.to_string().contains("no `cc`"), "{e}");
        let e = parse_payload(r#"{"cc": 1}"#).unwrap_err();
        assert!(e.to_string().contains("JSON map"), "{e}");
        let e = parse_payload(r##"{"cc":"#cloud-config\n: : [\n"}"##).unwrap_err();
        assert!(e.to_string().contains("YAML"), "{e}");
        let big = format!(r##"{{"cc":"#cloud-config\n{}"}}"##, "a".repeat(MAX_PAYLOAD));
        assert!(
            parse_payload(&big)
                .unwrap_err()
                .to_string()
                .contains("at most")
        );
    }

    #[test]
    fn a_token_fits_an_80_column_console() {
        let t = new_token();
        let q = qr_text(&t).unwrap();
        let width = q.lines().map(|l| l.chars().count()).max().unwrap();
        assert!(width <= 80, "{width} columns for a {}-byte token", t.len());
        assert!(q.lines().all(|l| l.chars().count() == width));
    }
}
