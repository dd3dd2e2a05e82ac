//! `kairos-immucore`: PID 1 of the initramfs, or `--plan CMDLINE` to show what it would boot.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if rustix::process::getpid().as_raw_nonzero().get() != 1 {
        match args.get(1).map(String::as_str) {
            Some("--plan") => {
                let cmdline = args.get(2).cloned().unwrap_or_default();
                match kairos_immucore::plan::Plan::from_cmdline(&cmdline) {
                    Ok(p) => println!("{p:#?}"),
                    Err(e) => {
                        eprintln!("kairos-immucore: {e}");
                        std::process::exit(1);
                    }
                }
            }
            _ => {
                eprintln!(
                    "kairos-immucore runs as /init of the Kairos initramfs.\nUsage: kairos-immucore --plan 'KERNEL CMDLINE'   show what would be booted"
                );
                std::process::exit(2);
            }
        }
        return;
    }
    let mut boot = kairos_immucore::boot::Boot::new();
    let result = boot.early_mounts().and_then(|_| boot.run());
    let poweroff = boot.plan.as_ref().is_some_and(|p| p.poweroff_on_failure);
    match result {
        Ok(()) => {
            let init = boot
                .plan
                .as_ref()
                .map(|p| p.init.clone())
                .unwrap_or_else(|| "/sbin/init".into());
            kairos_immucore::boot::say(&format!("switching root to /sysroot, exec {init}"));
            let Err(e) = kairos_immucore::boot::switch_root(&init);
            kairos_immucore::report_failure(&boot.failure_summary(&e), boot.oem_mounted());
            kairos_immucore::restart(poweroff);
        }
        Err(e) => {
            boot.write_timeline();
            kairos_immucore::report_failure(&boot.failure_summary(&e), boot.oem_mounted());
            kairos_immucore::restart(poweroff);
        }
    }
}
