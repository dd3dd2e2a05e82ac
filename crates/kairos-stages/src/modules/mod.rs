//! yip's modules. Each takes the step's own section and applies it under the target root.

mod datasource;
mod files;
mod git;
#[cfg(feature = "oci")]
mod images;
mod layout;
mod packages;
mod system;
mod systemctl;
pub use systemctl::unit_exists;
mod users;

use kairos_config::types::Step;

use crate::executor::Ctx;

/// yip's fixed per-step module order (`pkg/executor/executor.go`).
pub const ORDER: &[&str] = &[
    "dns",
    "downloads",
    "git",
    "ensure_entities",
    "directories",
    "files",
    "commands",
    "delete_entities",
    "hostname",
    "sysctl",
    "users",
    "authorized_keys",
    "modules",
    "timesyncd",
    "systemctl",
    "environment",
    "systemd_firstboot",
    "datasource",
    "layout",
    "package_pins",
    "packages",
    "unpack_images",
];

/// Runs module `name` for `step` if the step uses it.
pub fn run(name: &str, ctx: &Ctx, s: &Step) -> Result<(), String> {
    match name {
        "dns" => s.dns.as_ref().map_or(Ok(()), |d| system::dns(ctx, d)),
        "downloads" => each(&s.downloads, |d| files::download(ctx, d)),
        "git" => s.git.as_ref().map_or(Ok(()), |g| git::git(ctx, g)),
        "ensure_entities" => each(&s.ensure_entities, |e| users::entity(ctx, e, true)),
        "directories" => each(&s.directories, |d| files::directory(ctx, d)),
        "files" => each(&s.files, |f| files::file(ctx, f)),
        "commands" => each(&s.commands, |c| {
            let cmd = ctx.render(c);
            ctx.shell.run(&cmd).map(|_| ()).map_err(|e| e.to_string())
        }),
        "delete_entities" => each(&s.delete_entities, |e| users::entity(ctx, e, false)),
        "hostname" => s
            .hostname
            .as_deref()
            .filter(|h| !h.is_empty())
            .map_or(Ok(()), |h| system::hostname(ctx, h)),
        "sysctl" => {
            if s.sysctl.is_empty() {
                Ok(())
            } else {
                system::sysctl(ctx, &s.sysctl)
            }
        }
        "users" => {
            if s.users.is_empty() {
                Ok(())
            } else {
                users::users(ctx, &s.users)
            }
        }
        "authorized_keys" => {
            let mut errs = Vec::new();
            for (user, keys) in &s.authorized_keys {
                if let Err(e) = users::authorized_keys(ctx, user, keys) {
                    errs.push(e);
                }
            }
            join(errs)
        }
        "modules" => {
            if s.modules.is_empty() {
                Ok(())
            } else {
                system::kernel_modules(ctx, &s.modules)
            }
        }
        "timesyncd" => {
            if s.timesyncd.is_empty() {
                Ok(())
            } else {
                system::timesyncd(ctx, &s.timesyncd)
            }
        }
        "systemctl" => s
            .systemctl
            .as_ref()
            .map_or(Ok(()), |u| systemctl::apply(ctx, u)),
        "environment" => {
            if s.environment.is_empty() {
                Ok(())
            } else {
                system::environment(ctx, &s.environment, s.environment_file.as_deref())
            }
        }
        "systemd_firstboot" => {
            if s.systemd_firstboot.is_empty() {
                Ok(())
            } else {
                system::systemd_firstboot(ctx, &s.systemd_firstboot)
            }
        }
        "datasource" => s
            .datasource
            .as_ref()
            .map_or(Ok(()), |d| datasource::datasource(ctx, d)),
        "layout" => s.layout.as_ref().map_or(Ok(()), |l| layout::layout(ctx, l)),
        "package_pins" => {
            if s.package_pins.is_empty() {
                Ok(())
            } else {
                packages::pins(ctx, &s.package_pins)
            }
        }
        "packages" => s
            .packages
            .as_ref()
            .map_or(Ok(()), |p| packages::packages(ctx, p)),
        #[cfg(feature = "oci")]
        "unpack_images" => each(&s.unpack_images, |u| images::unpack(ctx, u)),
        #[cfg(not(feature = "oci"))]
        "unpack_images" => each(&s.unpack_images, |u| {
            Err(format!(
                "{}: images are not unpacked in the initramfs; run this step in the boot or network stage",
                u.source
            ))
        }),
        other => Err(format!("unknown module {other}")),
    }
}

fn each<T>(items: &[T], mut f: impl FnMut(&T) -> Result<(), String>) -> Result<(), String> {
    join(items.iter().filter_map(|i| f(i).err()).collect())
}

fn join(errs: Vec<String>) -> Result<(), String> {
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

/// Resolves `ownerstring` (wins) or numeric owner/group against the root's account files.
fn owner(
    ctx: &Ctx,
    ownerstring: Option<&str>,
    uid: Option<i64>,
    gid: Option<i64>,
) -> Result<(Option<u32>, Option<u32>), String> {
    if let Some(s) = ownerstring.filter(|s| !s.is_empty()) {
        let acc = crate::accounts::Accounts::load(ctx.root)
            .map_err(|e| format!("reading account files: {e}"))?;
        return acc.owner_string(s);
    }
    let conv = |v: Option<i64>| v.filter(|v| *v >= 0).map(|v| v as u32);
    Ok((conv(uid), conv(gid)))
}
