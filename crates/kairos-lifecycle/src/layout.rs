//! The partition layout of an installed disk (Kairos' GPT names and labels), sized from the
//! real payload — shared by `kairosctl build raw` and `kairos-agent install`.

/// One partition of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub name: &'static str,
    pub label: &'static str,
    pub type_guid: &'static str,
    pub start_mib: u64,
    pub size_mib: u64,
}

use kairos_sys::gpt::{ESP_TYPE as ESP_GUID, LINUX_TYPE as LINUX_GUID};

const MIB: u64 = 1 << 20;

/// Partition sizes in MiB, from the real sizes of what goes in, with headroom for one upgrade.
pub fn plan(esp_payload: u64, os_payload: u64, oem_mib: u64, persistent_mib: u64) -> Vec<Part> {
    let mib = |b: u64| b.div_ceil(MIB);
    // ESP: two kernel+initrd sets (active + recovery), doubled for an upgrade, + 16 MiB slack.
    let esp = (mib(esp_payload) * 2 + 16).max(64);
    // STATE holds the active layers plus room for one more deployment of the same size;
    // RECOVERY holds one deployment. ext4 overhead is ~5%.
    let state = mib(os_payload) * 2 + mib(os_payload) / 10 + 32;
    let recovery = mib(os_payload) + mib(os_payload) / 10 + 32;
    let mut start = 1;
    let mut parts = Vec::new();
    for (name, label, type_guid, size) in [
        ("efi", "COS_GRUB", ESP_GUID, esp),
        ("oem", "COS_OEM", LINUX_GUID, oem_mib),
        ("recovery", "COS_RECOVERY", LINUX_GUID, recovery),
        ("state", "COS_STATE", LINUX_GUID, state),
        ("persistent", "COS_PERSISTENT", LINUX_GUID, persistent_mib),
    ] {
        parts.push(Part {
            name,
            label,
            type_guid,
            start_mib: start,
            size_mib: size,
        });
        start += size;
    }
    parts
}

/// The smallest disk (MiB) a plan fits on, with a 1 MiB backup-GPT margin at the end.
pub fn min_disk_mib(parts: &[Part]) -> u64 {
    parts.last().map(|p| p.start_mib + p.size_mib).unwrap_or(1) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_is_aligned_and_ordered() {
        let p = plan(30 * MIB, 100 * MIB, 64, 64);
        let names: Vec<_> = p.iter().map(|x| x.label).collect();
        assert_eq!(
            names,
            [
                "COS_GRUB",
                "COS_OEM",
                "COS_RECOVERY",
                "COS_STATE",
                "COS_PERSISTENT"
            ]
        );
        assert_eq!(p[0].start_mib, 1);
        for w in p.windows(2) {
            assert_eq!(w[0].start_mib + w[0].size_mib, w[1].start_mib);
        }
        assert_eq!(p[0].size_mib, 76);
        assert_eq!(p[3].size_mib, 242);
        assert_eq!(min_disk_mib(&p), p[4].start_mib + 64 + 1);
    }
}
