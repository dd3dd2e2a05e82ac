//! Live-kernel actions that only make sense when the root is the running system.

use std::path::Path;

use crate::exec::{ExecError, run_program};

/// The kernel's hostname.
pub fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

pub fn set_hostname(name: &str) -> std::io::Result<()> {
    rustix::system::sethostname(name.as_bytes()).map_err(std::io::Error::from)
}

/// Names of the loaded kernel modules (`/proc/modules`).
pub fn loaded_modules() -> Vec<String> {
    std::fs::read_to_string("/proc/modules")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

pub fn modprobe(name: &str, params: &[String]) -> Result<(), ExecError> {
    let mut args = vec![name.to_string()];
    args.extend(params.iter().cloned());
    run_program("modprobe", &args).map(|_| ())
}

/// True when systemd is the running service manager.
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

pub fn systemctl(args: &[String]) -> Result<(), ExecError> {
    run_program("systemctl", args).map(|_| ())
}

/// Asks the init system for a reboot: systemd when it runs, else `reboot` (busybox, sysvinit).
pub fn reboot() -> Result<(), ExecError> {
    if systemd_running() {
        systemctl(&["reboot".to_string()])
    } else {
        run_program("reboot", &[]).map(|_| ())
    }
}

/// Asks the init system to power off.
pub fn poweroff() -> Result<(), ExecError> {
    if systemd_running() {
        systemctl(&["poweroff".to_string()])
    } else {
        run_program("poweroff", &[]).map(|_| ())
    }
}
