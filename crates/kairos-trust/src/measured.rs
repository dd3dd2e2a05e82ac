//! What a booted node's PCR 11 says, against its UKI: which boot phase it is at, or that it
//! matches none (and how far it got), and whether the UKI's signed policy covers the value —
//! what decides whether a disk sealed to the owner's PCR key unlocks. Pure: the caller reads
//! the UKI and the PCR.

use serde::Serialize;

use crate::pcr::{self, Pcr};
use crate::pe::Pe;

/// The verdict on PCR 11.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum Pcr11 {
    /// Equal to the prediction at this phase path (`enter-initrd:leave-initrd`…).
    Matches { phase: String },
    /// The UKI's sections were measured and no phase after them.
    NoPhase,
    /// Equal to no predicted value: something else was measured (another UKI, a phase out
    /// of order, an extra extend).
    Differs,
    /// No TPM, or the kernel does not show PCRs.
    Unknown,
}

/// Everything `kairos-agent state` shows about measured boot.
#[derive(Debug, Clone, Serialize)]
pub struct Assessment {
    pub pcr11: Option<String>,
    pub result: Pcr11,
    /// PCR 11 predicted from the booted UKI, per phase path.
    pub predicted: Vec<(String, String)>,
    /// PCR 11 after the UKI's sections, before any phase.
    pub after_sections: String,
    /// The UKI's `.pcrsig` has a policy for the current PCR 11 value (SHA-256 bank).
    pub policy_covers_now: bool,
    /// Phase paths the UKI's `.pcrsig` signs (by their policy digests).
    pub signed_phases: Vec<String>,
    /// One sentence for people.
    pub summary: String,
}

/// Compares `pcr11` (hex, from the TPM) with what `uki` predicts.
pub fn assess(uki: &[u8], pcr11: Option<&str>) -> Result<Assessment, crate::pe::PeError> {
    let pe = Pe::parse(uki)?;
    let sections: Vec<(&str, &[u8])> = pe
        .sections
        .iter()
        .map(|s| (s.name.as_str(), s.data(uki)))
        .collect();
    let after = pcr::after_sections(sections.iter().copied());
    let phases = pcr::phases(after);
    // The policy digests the UKI carries signed, mapped back to phases.
    let pols: Vec<String> = pe
        .section(".pcrsig")
        .and_then(|s| serde_json::from_slice::<serde_json::Value>(s.data(uki)).ok())
        .and_then(|v| {
            v.get("sha256").and_then(|a| a.as_array()).map(|a| {
                a.iter()
                    .filter_map(|e| e.get("pol").and_then(|p| p.as_str()).map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default();
    let signed_phases: Vec<String> = phases
        .iter()
        .filter(|(_, v)| pols.contains(&pcr::hex(&pcr::policy_pcr11(v))))
        .map(|(p, _)| p.clone())
        .collect();
    let now = pcr11.map(|s| s.trim().to_ascii_lowercase());
    let result = match &now {
        None => Pcr11::Unknown,
        Some(v) => match phases.iter().find(|(_, p)| &p.hex() == v) {
            Some((phase, _)) => Pcr11::Matches {
                phase: phase.clone(),
            },
            None if *v == after.hex() => Pcr11::NoPhase,
            None => Pcr11::Differs,
        },
    };
    let policy_covers_now = now
        .as_deref()
        .and_then(parse_hex32)
        .is_some_and(|v| pols.contains(&pcr::hex(&pcr::policy_pcr11(&Pcr(v)))));
    let summary = match &result {
        Pcr11::Matches { phase } if policy_covers_now => format!(
            "PCR 11 matches the prediction at {phase}; the signed policy covers this value"
        ),
        Pcr11::Matches { phase } => format!(
            "PCR 11 matches the prediction at {phase}; the signed policy covers {} only (sealed disks unlock in the initrd, not now)",
            if signed_phases.is_empty() {
                "no phase".to_string()
            } else {
                signed_phases.join(", ")
            }
        ),
        Pcr11::NoPhase => "PCR 11 holds the UKI's sections but no boot phase: the initrd did not extend enter-initrd (no TPM device in the initrd?)".into(),
        Pcr11::Differs => format!(
            "PCR 11 matches no phase of the booted UKI (first expected: {} at enter-initrd): another UKI was measured, or a phase was extended out of order — a disk sealed to the PCR key will not unlock in this state",
            phases.first().map(|(_, p)| p.hex()).unwrap_or_default()
        ),
        Pcr11::Unknown => "no TPM PCR 11 to compare (no TPM, or a kernel before 6.1)".into(),
    };
    Ok(Assessment {
        pcr11: now,
        result,
        predicted: phases.iter().map(|(p, v)| (p.clone(), v.hex())).collect(),
        after_sections: after.hex(),
        policy_covers_now,
        signed_phases,
        summary,
    })
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal UKI: a PE with the measured sections and a .pcrsig naming two phases.
    fn uki(signed: &[usize]) -> (Vec<u8>, Vec<(String, Pcr)>) {
        let stub = crate::pe::tests::tiny_pe();
        let secs: Vec<(&str, &[u8])> = vec![(".linux", b"KERNEL"), (".cmdline", b"x=1")];
        let phases = pcr::phases(pcr::after_sections(secs.iter().copied()));
        let pols: Vec<serde_json::Value> = signed
            .iter()
            .map(|&i| serde_json::json!({"pol": pcr::hex(&pcr::policy_pcr11(&phases[i].1))}))
            .collect();
        let sig = serde_json::json!({ "sha256": pols }).to_string();
        let mut all = secs.clone();
        all.push((".pcrsig", sig.as_bytes()));
        (crate::pe::append_sections(&stub, &all).unwrap(), phases)
    }

    #[test]
    fn verdicts() {
        let (img, phases) = uki(&[0, 1]);
        let at = |i: usize| phases[i].1.hex();
        let a = assess(&img, Some(&at(1).to_uppercase())).unwrap();
        assert_eq!(
            a.result,
            Pcr11::Matches {
                phase: "enter-initrd:leave-initrd".into()
            }
        );
        assert!(a.policy_covers_now);
        assert_eq!(
            a.signed_phases,
            vec!["enter-initrd", "enter-initrd:leave-initrd"]
        );
        let a = assess(&img, Some(&at(3))).unwrap();
        assert!(matches!(a.result, Pcr11::Matches { .. }));
        assert!(!a.policy_covers_now, "ready is not signed in this UKI");
        assert!(
            a.summary
                .contains("the signed policy covers enter-initrd, enter-initrd:leave-initrd only"),
            "{}",
            a.summary
        );
        let after = pcr::after_sections([(".linux", &b"KERNEL"[..]), (".cmdline", b"x=1")]);
        assert_eq!(
            assess(&img, Some(&after.hex())).unwrap().result,
            Pcr11::NoPhase
        );
        let a = assess(&img, Some(&"ab".repeat(32))).unwrap();
        assert_eq!(a.result, Pcr11::Differs);
        assert!(a.summary.contains(&at(0)), "{}", a.summary);
        assert_eq!(assess(&img, None).unwrap().result, Pcr11::Unknown);
        assert!(assess(b"not a PE", None).is_err());
    }
}
