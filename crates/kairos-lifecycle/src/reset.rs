//! Reset from recovery: COS_STATE is made again from the recovery deployment (the one running),
//! COS_PERSISTENT is wiped unless asked to keep it, COS_OEM is kept unless asked to wipe it,
//! and the active entry boots the fresh STATE. Only runs in recovery mode, where neither STATE
//! nor PERSISTENT is mounted.

use std::path::Path;

use kairos_layers::Store;
use kairos_sys::mount::{self, MountFlags};

use crate::entries::{self, Role};
use crate::history::{self, Record};
use crate::{Error, io_err, upgrade};

#[derive(Debug, Clone, Copy)]
pub struct ResetOptions {
    pub reset_persistent: bool,
    pub reset_oem: bool,
}

/// Formats the partition labelled `label`. An encrypted partition that is open (COS_OEM in
/// recovery) gets a fresh filesystem inside its volume; one that is closed (COS_PERSISTENT in
/// recovery) is erased (its key forgotten) and formatted plain: the next boot encrypts it
/// again if `install.encrypted_partitions` still lists it.
fn mkfs_ext4(tools_root: &Path, label: &str) -> Result<String, Error> {
    let dev = match (
        kairos_sys::blockdev::find_by_label(label),
        kairos_sys::blockdev::find_luks_by_label(label),
    ) {
        (Some(dev), _) => dev,
        (None, Some(luks)) => {
            kairos_sys::luks::erase(&luks)
                .map_err(|e| Error::Node(format!("erasing the encrypted {label}: {e}")))?;
            luks
        }
        (None, None) => crate::mounts::device_for(label)?,
    };
    let d = dev.to_string_lossy().into_owned();
    kairos_sys::exec::Cmd::argv(&kairos_sys::tools::argv(tools_root, "mke2fs"))
        .args(["-t", "ext4", "-q", "-F", "-L", label, &d])
        .run()
        .map_err(|e| Error::Node(format!("formatting {d} ({label}): {e}")))?;
    Ok(d)
}

/// Whether this boot asked for a reset by itself: `kairos.reset` on the cmdline (the reset
/// entry of a plain disk), or booted from the reset entry (`autoreset.conf`, from
/// `LoaderEntrySelected`) — a trusted disk's entries all boot the same signed UKI, whose
/// cmdline cannot say it.
pub fn requested(cmdline: &str, entry: Option<&str>) -> bool {
    cmdline.split_whitespace().any(|w| w == "kairos.reset")
        || entry
            .and_then(entries::parse_name)
            .is_some_and(|(role, _)| role == Role::Autoreset)
}

/// Resets the node. `recovery` is the mounted recovery store, `booted` the recovery
/// deployment running now, `esp` the mounted ESP.
pub fn reset(
    recovery: &Path,
    booted: &str,
    esp: &Path,
    opts: ResetOptions,
    tools_root: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<(), Error> {
    let rec = Store::new(recovery);
    let dep = rec.read_deployment(booted)?;
    log("formatting COS_STATE");
    let state_dev = mkfs_ext4(tools_root, "COS_STATE")?;
    let target = Path::new(crate::install::TARGET).join("state");
    std::fs::create_dir_all(&target).map_err(io_err(&target))?;
    mount::mount(
        &state_dev,
        &target.to_string_lossy(),
        "ext4",
        MountFlags::empty(),
        "",
    )
    .map_err(|e| Error::Node(format!("mounting {state_dev}: {e}")))?;
    let copied = (|| {
        log("copying the recovery deployment to COS_STATE");
        for b in dep
            .layers
            .iter()
            .map(|l| &l.image)
            .chain(dep.kernel.iter())
            .chain(dep.initrd.iter())
        {
            upgrade::copy_if_missing(&recovery.join(&b.file), &target.join(&b.file))?;
        }
        Store::new(&target).write_deployment(&dep)?;
        history::append(&target, &Record::new("reset", &dep.id, &dep.image, ""))?;
        kairos_sys::fs::sync_filesystem(&target).map_err(io_err(&target))
    })();
    let _ = mount::unmount(&target.to_string_lossy(), false);
    copied?;
    if opts.reset_persistent {
        log("wiping COS_PERSISTENT");
        mkfs_ext4(tools_root, "COS_PERSISTENT")?;
    }
    if opts.reset_oem {
        log("wiping COS_OEM");
        let _ = mount::unmount("/oem", true);
        mkfs_ext4(tools_root, "COS_OEM")?;
    }
    // The switch, last: active boots the fresh STATE; no passive to fall back to.
    entries::set(
        esp,
        Role::Active,
        &upgrade::entry_for(Role::Active, &dep)?,
        None,
    )?;
    entries::clear(esp, Role::Passive)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_reset_is_asked_by_the_cmdline_or_the_entry() {
        use super::requested;
        assert!(requested("console=ttyS0 kairos.reset", None));
        assert!(requested("kairos.deployment=d", Some("autoreset.conf")));
        assert!(requested("", Some("autoreset+2-1.conf")));
        assert!(!requested("kairos.reset=no", Some("recovery.conf")));
        assert!(!requested("", Some("active.conf")));
        assert!(!requested("", None));
    }
}
