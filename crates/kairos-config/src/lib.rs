//! Kairos cloud-config: reading, collecting, merging, typing and validating configs.
//!
//! - [`yaml`]: YAML with positions and go-yaml v3 scalar typing;
//! - [`collect`]: config dirs, kernel cmdline and `config_url` chains folded by [`merge`];
//! - [`types`]: the typed config and its JSON Schema; [`validate`]: problems with file:line:column.

pub mod cmdline;
pub mod collect;
pub mod decode;
pub mod keys;
pub mod merge;
pub mod names;
pub mod node;
pub mod types;
pub mod validate;
pub mod yaml;

pub use collect::{Collected, Collector, Fetcher, HttpFetcher};
pub use node::{Node, Origin, Value};

use hmac::{Hmac, Mac};

/// Random alphanumeric text (`.Random` in templates).
pub fn random_string(n: usize) -> String {
    use rand::Rng;
    use rand::distr::Alphanumeric;
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// HMAC-SHA256 of the machine id keyed by an application name, hex (`.ProtectedID`).
pub fn protected_id(machine_id: &str, app: &str) -> String {
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(app.as_bytes()).expect("HMAC takes any key length");
    mac.update(machine_id.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
