//! Trusted boot on a node: a deployment's signed UKI is checked before anything is written —
//! signed by a certificate the firmware's `db` holds, and built for exactly the image being
//! installed (its signed cmdline names the deployment and pins every layer image) — then
//! put on the ESP beside the others.

use std::path::Path;

use kairos_layers::Deployment;
use kairos_trust::signature::{self, Signed};

use crate::Error;

/// A UKI larger than this is refused unread: it is read whole into memory, and firmware
/// loads far smaller ones (builds warn over 250 MiB).
pub const MAX_UKI: u64 = 512 << 20;

/// What a trusted UKI's cmdline says it boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pins {
    pub deployment: String,
    /// sha256 of each layer image, base first.
    pub layers: Vec<String>,
}

/// The pins in a UKI's cmdline (`kairos.deployment=… rd.kairos.layers=a,b`); `None` when it
/// has none or they are malformed (not a Kairos trusted UKI).
pub fn pins(cmdline: &str) -> Option<Pins> {
    let get = |k: &str| {
        cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
    };
    Some(Pins {
        deployment: get("kairos.deployment")?.to_string(),
        layers: kairos_layers::parse_pins(get(kairos_layers::PINS_ARG)?).ok()?,
    })
}

/// The certificates of the firmware's `db` (efivarfs at `efivars`).
fn firmware_db(efivars: &Path) -> Result<Vec<x509_cert::Certificate>, Error> {
    let data = kairos_sys::efi::read_var_max(
        efivars,
        "db",
        kairos_sys::efi::IMAGE_SECURITY_GUID,
        kairos_sys::efi::MAX_DB,
    )
    .ok_or_else(|| {
        Error::Node(format!(
            "the firmware has no signature database (no db variable under {}): Secure Boot keys are not enrolled, so no signed UKI can be checked",
            efivars.display()
        ))
    })?;
    signature::parse_signature_lists(&data)
        .map_err(|e| Error::Node(format!("the firmware's db: {e}")))
}

/// What the firmware trusts and what it revokes (`db`, `dbx` under `efivars`).
pub struct Firmware {
    pub db: Vec<x509_cert::Certificate>,
    pub dbx: signature::SignatureLists,
}

/// Reads `db` (required) and `dbx` (empty when absent).
pub fn firmware(efivars: &Path) -> Result<Firmware, Error> {
    let db = firmware_db(efivars)?;
    let dbx = match kairos_sys::efi::read_var_max(
        efivars,
        "dbx",
        kairos_sys::efi::IMAGE_SECURITY_GUID,
        kairos_sys::efi::MAX_DB,
    ) {
        Some(data) => signature::parse_all_signature_lists(&data)
            .map_err(|e| Error::Node(format!("the firmware's dbx: {e}")))?,
        None => signature::SignatureLists::default(),
    };
    Ok(Firmware { db, dbx })
}

/// Reads a UKI (bounded) and checks its signature against the firmware's `db` and `dbx`.
pub fn read_and_verify(path: &Path, fw: &Firmware) -> Result<(Vec<u8>, Signed), Error> {
    let size = std::fs::metadata(path).map_err(crate::io_err(path))?.len();
    if size > MAX_UKI {
        return Err(Error::Node(format!(
            "{}: {size} bytes, over the {} MiB a UKI may be",
            path.display(),
            MAX_UKI >> 20
        )));
    }
    let bytes = std::fs::read(path).map_err(crate::io_err(path))?;
    let signed = signature::verify_not_revoked(&bytes, &fw.db, &fw.dbx).map_err(|e| {
        Error::Node(format!(
            "{} is refused: {e}; nothing was changed",
            path.display()
        ))
    })?;
    Ok((bytes, signed))
}

/// The UKI's pins, read from its `.cmdline`.
pub fn uki_pins(path: &Path, bytes: &[u8]) -> Result<Pins, Error> {
    let pe = kairos_trust::pe::Pe::parse(bytes)
        .map_err(|e| Error::Node(format!("{}: {e}", path.display())))?;
    let cmdline = pe
        .section(".cmdline")
        .map(|s| String::from_utf8_lossy(s.data(bytes)).into_owned())
        .unwrap_or_default();
    pins(&cmdline).ok_or_else(|| {
        Error::Node(format!(
            "{}: its cmdline names no deployment and layers (kairos.deployment=, rd.kairos.layers=): build it with `kairosctl build uki --image REF`",
            path.display()
        ))
    })
}

/// Everything checked of a UKI before an upgrade writes anything: the firmware's db (under
/// `efivars`) trusts its signer and its dbx does not revoke it, its cmdline pins a deployment, the ESP has room for it.
pub fn check_uki(
    node: &crate::Node,
    efivars: &Path,
    path: &Path,
) -> Result<(Vec<u8>, Pins, Signed), Error> {
    let (bytes, signed) = read_and_verify(path, &firmware(efivars)?)?;
    let pins = uki_pins(path, &bytes)?;
    check_esp_room(&node.esp, bytes.len() as u64)?;
    Ok((bytes, pins, signed))
}

/// The UKI was built for this deployment: same id, same layer images in the same order.
pub fn check_pins(pins: &Pins, dep: &Deployment) -> Result<(), Error> {
    let have = dep.pins();
    if pins.deployment != dep.id || pins.layers != have {
        return Err(Error::Node(format!(
            "the UKI was built for deployment {} (layers {}), but the image gives deployment {} (layers {}): build the UKI from this image (`kairosctl build uki --image {}`); nothing boots differently",
            pins.deployment,
            short(&pins.layers),
            dep.id,
            short(&have),
            dep.image
        )));
    }
    Ok(())
}

fn short<S: AsRef<str>>(v: &[S]) -> String {
    v.iter()
        .map(|h| h.as_ref().get(..12).unwrap_or(h.as_ref()).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The ESP has room for a UKI of `len` bytes (checked before anything is staged).
pub fn check_esp_room(esp: &Path, len: u64) -> Result<(), Error> {
    let free = kairos_sys::fs::free_bytes(esp).map_err(crate::io_err(esp))?;
    let need = len + (1 << 20);
    if free < need {
        return Err(Error::Node(format!(
            "the ESP ({}) has {} MiB free and the UKI needs {} MiB: remove unused deployments (`kairos-agent state` lists them) or give the node a larger ESP; nothing was changed",
            esp.display(),
            free >> 20,
            need.div_ceil(1 << 20)
        )));
    }
    Ok(())
}

/// Puts the UKI on the ESP and records it in the deployment (its entries then boot it).
pub fn install_uki(node: &crate::Node, dep: &mut Deployment, bytes: &[u8]) -> Result<(), Error> {
    let rel = crate::esp_uki_path(&dep.id);
    let dest = node.esp.join(rel.trim_start_matches('/'));
    kairos_layers::write_atomic(&dest, bytes)?;
    dep.uki = Some(rel);
    kairos_layers::Store::new(&node.store).write_deployment(dep)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_from_cmdline_and_against_a_deployment() {
        let h = |c: char| c.to_string().repeat(64);
        let p = pins(&format!(
            "console=ttyS0 kairos.deployment=d-1 rd.kairos.layers={},{}",
            h('a'),
            h('B')
        ))
        .unwrap();
        assert_eq!(p.deployment, "d-1");
        assert_eq!(p.layers, vec![h('a'), h('b')]);
        assert_eq!(pins("console=ttyS0 kairos.deployment=d-1"), None);
        assert_eq!(pins("kairos.deployment=d-1 rd.kairos.layers=zz"), None);
        let layer = |c: char| kairos_layers::Layer {
            digest: kairos_layers::Digest::of(c.to_string().as_bytes()),
            image: kairos_layers::Blob {
                file: String::new(),
                size: 1,
                sha256: h(c),
            },
            verity: None,
        };
        let mut dep = Deployment {
            id: "d-1".into(),
            image: "oci:x".into(),
            manifest_digest: String::new(),
            version: String::new(),
            created: String::new(),
            layers: vec![layer('a'), layer('b')],
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            uki: None,
        };
        check_pins(&p, &dep).unwrap();
        dep.layers.reverse();
        let e = check_pins(&p, &dep).unwrap_err().to_string();
        assert!(e.contains("kairosctl build uki --image oci:x"), "{e}");
        dep.layers.reverse();
        dep.id = "d-2".into();
        assert!(check_pins(&p, &dep).is_err());
    }
}
