//! `kairos-immucore`, the initramfs `/init`: reads the boot entry's cmdline, mounts the
//! deployment's layer images as a read-only overlay root, gives ephemeral paths a tmpfs upper
//! and persistent paths a bind from COS_PERSISTENT, runs the `rootfs` and `initramfs` stages,
//! writes `/run/cos/<mode>_mode`, `/etc/fstab` and a boot timeline, and switches root. Any
//! failure is summarised on every console and on OEM, then the machine reboots so that boot
//! assessment can pick another entry.

pub mod boot;
pub mod crypt;
pub mod plan;

use std::fs;
use std::io::Write;
use std::time::Duration;

use kairos_sys::mount::MountFlags;

/// Writes the summary everywhere a person or a later boot can see it; `oem_mounted` says
/// whether COS_OEM is already at /sysroot/oem (else it is mounted just for this).
pub fn report_failure(summary: &str, oem_mounted: bool) {
    // /dev/console is the last console= of the cmdline; tty1 is the screen when that is serial.
    for console in ["/dev/console", "/dev/tty1"] {
        if let Ok(mut f) = fs::OpenOptions::new().write(true).open(console) {
            let _ = f.write_all(summary.as_bytes());
        }
    }
    boot::say(summary.lines().nth(2).unwrap_or("boot failed"));
    let oem_dir = if oem_mounted {
        Some("/sysroot/oem".to_string())
    } else {
        kairos_sys::blockdev::find_by_label("COS_OEM").and_then(|dev| {
            let _ = fs::create_dir_all("/run/kairos/oem");
            kairos_sys::mount::mount(
                &dev.to_string_lossy(),
                "/run/kairos/oem",
                "ext4",
                MountFlags::empty(),
                "",
            )
            .ok()
            .map(|_| "/run/kairos/oem".to_string())
        })
    };
    if let Some(dir) = oem_dir {
        let path = format!("{dir}/boot-failure.log");
        if fs::write(&path, summary).is_ok() {
            boot::say("failure summary saved to COS_OEM as /oem/boot-failure.log");
            rustix::fs::sync();
        }
    }
}

/// Reboots (or powers off) after a pause long enough to read the summary.
pub fn restart(poweroff: bool) -> ! {
    std::thread::sleep(Duration::from_secs(5));
    rustix::fs::sync();
    let cmd = if poweroff {
        rustix::system::RebootCommand::PowerOff
    } else {
        rustix::system::RebootCommand::Restart
    };
    let _ = rustix::system::reboot(cmd);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
