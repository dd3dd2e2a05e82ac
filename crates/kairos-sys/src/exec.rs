//! Running external programs: [`Cmd`], the one runner every crate uses (argv, exit status and
//! stderr in the error, the Debian package named when a tool is missing), and the `sh -c`
//! shell of stage commands, on the host or chrooted into a target root.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use std::path::Path;

use crate::root::Root;

/// Combined output of a finished command.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub status: i32,
    pub output: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("failed to run {cmd}: exit status {status}: {output}")]
    Failed {
        cmd: String,
        status: i32,
        output: String,
    },
    #[error("failed to run {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot run {cmd:?} inside {root}: it has no /bin/sh; add a shell to the target tree or run against /"
    )]
    NoShell { cmd: String, root: String },
    #[error("missing tools: {0}; install them with apt-get install")]
    Missing(String),
}

/// The programs Kairos runs, with the Debian package that ships each: named in the error
/// when one is missing, and checked up front by [`require`].
pub const TOOLS: &[(&str, &str)] = &[
    ("sfdisk", "fdisk"),
    ("mkfs.ext4", "e2fsprogs"),
    ("mke2fs", "e2fsprogs"),
    ("e2fsck", "e2fsprogs"),
    ("mkfs.erofs", "erofs-utils"),
    ("mkfs.vfat", "dosfstools"),
    ("mkfs.fat", "dosfstools"),
    ("mcopy", "mtools"),
    ("xorriso", "xorriso"),
    ("cpio", "cpio"),
    ("cp", "coreutils"),
    ("tar", "tar"),
    ("ldd", "libc-bin"),
    ("qemu-img", "qemu-utils"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("modprobe", "kmod"),
    ("systemctl", "systemd"),
    ("systemd-firstboot", "systemd"),
    ("docker-registry", "docker-registry"),
    ("git", "git"),
    ("resize2fs", "e2fsprogs"),
    ("mkswap", "util-linux"),
    ("xfs_growfs", "xfsprogs"),
    ("mkfs.xfs", "xfsprogs"),
    ("mkfs.btrfs", "btrfs-progs"),
    ("btrfs", "btrfs-progs"),
    ("openssl", "openssl"),
    ("sbsign", "sbsigntool"),
];

/// The Debian package of a tool, when Kairos knows it.
pub fn package_of(tool: &str) -> Option<&'static str> {
    let name = Path::new(tool).file_name()?.to_str()?;
    TOOLS.iter().find(|(t, _)| *t == name).map(|(_, p)| *p)
}

fn on_path(tool: &str) -> bool {
    if tool.contains('/') {
        return Path::new(tool).is_file();
    }
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/sbin", "/usr/sbin"])
        .any(|d| Path::new(d).join(tool).is_file())
}

/// Checks at a command's start that every tool it will run is there; the error lists the
/// missing ones with their Debian packages.
pub fn require(tools: &[&str]) -> Result<(), ExecError> {
    let missing: Vec<String> = tools
        .iter()
        .filter(|t| !on_path(t))
        .map(|t| match package_of(t) {
            Some(p) => format!("{t} (Debian package {p})"),
            None => t.to_string(),
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ExecError::Missing(missing.join(", ")))
    }
}

/// What a finished program wrote.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Output {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// One external program, run to completion. Build it like `std::process::Command`; `run`
/// fails with the argv, the exit status and stderr when the program fails, and with the
/// Debian package to install when it is missing.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    stdin: Option<Vec<u8>>,
    env: Vec<(OsString, OsString)>,
    dir: Option<std::path::PathBuf>,
    root: Option<std::path::PathBuf>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Cmd {
        Cmd {
            program: program.as_ref().to_os_string(),
            args: Vec::new(),
            stdin: None,
            env: Vec::new(),
            dir: None,
            root: None,
        }
    }

    /// Runs the program chrooted into `root` (a mounted OS tree; the program's path is inside
    /// it). The caller makes `/dev`, `/proc`, `/sys` there what the program needs.
    pub fn chroot(mut self, root: impl Into<std::path::PathBuf>) -> Cmd {
        self.root = Some(root.into());
        self
    }

    /// An environment variable for the program (not shown in messages: it may be a secret).
    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Cmd {
        self.env
            .push((k.as_ref().to_os_string(), v.as_ref().to_os_string()));
        self
    }

    /// The program's working directory.
    pub fn current_dir(mut self, d: impl Into<std::path::PathBuf>) -> Cmd {
        self.dir = Some(d.into());
        self
    }

    /// From an argv (`[program, args…]`), e.g. [`crate::tools::argv`]'s.
    pub fn argv<S: AsRef<OsStr>>(argv: &[S]) -> Cmd {
        let mut it = argv.iter();
        let mut c = Cmd::new(it.next().map(|s| s.as_ref()).unwrap_or(OsStr::new("")));
        c.args = it.map(|a| a.as_ref().to_os_string()).collect();
        c
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Cmd {
        self.args.push(a.as_ref().to_os_string());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// Bytes fed to the program's stdin (otherwise stdin is /dev/null).
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Cmd {
        self.stdin = Some(data.into());
        self
    }

    /// The command line as a person would type it (for messages).
    pub fn shown(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| {
                let a = a.to_string_lossy();
                if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                    format!("'{}'", a.replace('\'', "'\\''"))
                } else {
                    a.into_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs it; a non-zero exit is a result here, not an error.
    pub fn run_status(&self) -> Result<Output, ExecError> {
        let shown = self.shown();
        let spawn_err = |source: std::io::Error| {
            let prog = self.program.to_string_lossy();
            if source.kind() == std::io::ErrorKind::NotFound {
                ExecError::Missing(match package_of(&prog) {
                    Some(p) => format!("{prog} (Debian package {p})"),
                    None => prog.into_owned(),
                })
            } else {
                ExecError::Spawn {
                    cmd: shown.clone(),
                    source,
                }
            }
        };
        let mut c = Command::new(&self.program);
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(d) = &self.dir {
            c.current_dir(d);
        }
        if let Some(root) = &self.root {
            if self.dir.is_none() {
                c.current_dir("/");
            }
            chroot_child(&mut c, root).map_err(spawn_err)?;
        }
        c.args(&self.args)
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().map_err(spawn_err)?;
        let feeder = match (self.stdin.clone(), child.stdin.take()) {
            (Some(data), Some(mut pipe)) => Some(std::thread::spawn(move || {
                // A program that exits without reading all of it is not our error.
                let _ = pipe.write_all(&data);
            })),
            _ => None,
        };
        let out = child
            .wait_with_output()
            .map_err(|source| ExecError::Spawn {
                cmd: shown.clone(),
                source,
            })?;
        if let Some(f) = feeder {
            let _ = f.join();
        }
        Ok(Output {
            status: out.status.code().unwrap_or(128),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs it; a non-zero exit is an error with the argv, the status and stderr.
    pub fn run(&self) -> Result<Output, ExecError> {
        let out = self.run_status()?;
        if out.status != 0 {
            let text = if out.stderr.trim().is_empty() {
                String::from_utf8_lossy(&out.stdout).trim_end().to_string()
            } else {
                out.stderr.trim_end().to_string()
            };
            return Err(ExecError::Failed {
                cmd: self.shown(),
                status: out.status,
                output: text,
            });
        }
        Ok(out)
    }
}

/// Runs `sh -c` commands the way yip's console does: stdout and stderr combined.
#[derive(Debug, Clone)]
pub struct Shell {
    root: Root,
    env: Vec<(String, String)>,
}

impl Shell {
    pub fn new(root: Root) -> Self {
        Shell {
            root,
            env: Vec::new(),
        }
    }

    pub fn with_env(mut self, env: Vec<(String, String)>) -> Self {
        self.env = env;
        self
    }

    /// Runs `cmd` with `sh -c`; chrooted into the root when it is not the running system.
    pub fn run(&self, cmd: &str) -> Result<CommandOutput, ExecError> {
        let out = self.run_status(cmd)?;
        if out.status != 0 {
            return Err(ExecError::Failed {
                cmd: cmd.to_string(),
                status: out.status,
                output: out.output.trim_end().to_string(),
            });
        }
        Ok(out)
    }

    /// Like [`Shell::run`] but a non-zero exit is a result, not an error (for `if:`).
    pub fn run_status(&self, cmd: &str) -> Result<CommandOutput, ExecError> {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(cmd);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        if !self.root.is_host() {
            if !self.root.join("bin/sh").exists() {
                return Err(ExecError::NoShell {
                    cmd: cmd.to_string(),
                    root: self.root.path().display().to_string(),
                });
            }
            c.current_dir("/");
            chroot_child(&mut c, self.root.path()).map_err(|source| ExecError::Spawn {
                cmd: cmd.to_string(),
                source,
            })?;
        }
        run_combined(c, cmd)
    }
}

/// Makes `c`'s child chroot into `root` (and chdir to its `/`) between fork and exec: the
/// one place Kairos runs a program inside another root.
fn chroot_child(c: &mut Command, root: &Path) -> std::io::Result<()> {
    // The path is made a C string here, before the fork: the child may not allocate.
    let dir = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the root path contains a NUL byte",
        )
    })?;
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec; it only makes two
    // async-signal-safe syscalls (chroot, chdir) on C strings built before the fork, and
    // allocates nothing.
    unsafe {
        c.pre_exec(move || {
            rustix::process::chroot(dir.as_c_str())?;
            rustix::process::chdir(c"/")?;
            Ok(())
        });
    }
    Ok(())
}

/// Restores the default action for SIGPIPE, as a command-line tool wants it: the Rust runtime
/// ignores SIGPIPE, so `kairos-agent schema | head` would otherwise get EPIPE from the next
/// write and panic in `println!`. With the default action the process ends quietly when the
/// reader goes away, like `cat` does. Call it first thing in `main`.
pub fn default_sigpipe() {
    #[allow(unsafe_code)]
    // SAFETY: called at the start of main, before any thread exists; setting a signal's
    // disposition to SIG_DFL installs no handler code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Runs a program (not through a shell) on the host, e.g. `modprobe`, `systemctl`.
pub fn run_program(program: &str, args: &[String]) -> Result<CommandOutput, ExecError> {
    let out = Cmd::new(program).args(args).run()?;
    let mut output = out.stdout_text();
    output.push_str(&out.stderr);
    Ok(CommandOutput {
        status: out.status,
        output,
    })
}

fn run_combined(mut c: Command, shown: &str) -> Result<CommandOutput, ExecError> {
    let spawn_err = |source| ExecError::Spawn {
        cmd: shown.to_string(),
        source,
    };
    let (mut reader, writer) = std::io::pipe().map_err(spawn_err)?;
    let writer2 = writer.try_clone().map_err(spawn_err)?;
    c.stdin(Stdio::null()).stdout(writer).stderr(writer2);
    let mut child = c.spawn().map_err(spawn_err)?;
    // Drop our copies of the write end so the read below sees EOF when the child exits.
    drop(c);
    let mut output = Vec::new();
    reader.read_to_end(&mut output).map_err(spawn_err)?;
    let status = child.wait().map_err(spawn_err)?;
    Ok(CommandOutput {
        status: status.code().unwrap_or(128),
        output: String::from_utf8_lossy(&output).into_owned(),
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_runner_reports_argv_status_stderr_and_packages() {
        let out = Cmd::new("cat").stdin(b"hello".to_vec()).run().unwrap();
        assert_eq!(out.stdout, b"hello");
        let e = Cmd::new("sh")
            .args(["-c", "echo oops >&2; exit 3"])
            .run()
            .unwrap_err()
            .to_string();
        assert!(e.contains("sh -c 'echo oops >&2; exit 3'"), "{e}");
        assert!(e.contains("exit status 3") && e.contains("oops"), "{e}");
        assert_eq!(Cmd::new("false").run_status().unwrap().status, 1);
        let e = Cmd::new("/nonexistent/mkfs.erofs")
            .run()
            .unwrap_err()
            .to_string();
        assert!(e.contains("erofs-utils"), "{e}");
        let e = require(&["sh", "no-such-tool-xyz", "mcopy-not-there"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no-such-tool-xyz") && !e.contains("sh,"), "{e}");
        assert!(require(&["sh"]).is_ok());
    }

    use super::*;

    #[test]
    fn host_command_output_and_failure() {
        let sh = Shell::new(Root::host());
        let out = sh.run("echo hi; echo err >&2").unwrap();
        assert_eq!(out.output, "hi\nerr\n");
        let err = sh.run("echo bad; exit 3").unwrap_err().to_string();
        assert!(err.contains("exit status 3"), "{err}");
        assert!(err.contains("bad"), "{err}");
    }

    #[test]
    fn offline_root_without_shell_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let sh = Shell::new(Root::new(d.path()));
        let err = sh.run("true").unwrap_err().to_string();
        assert!(err.contains("has no /bin/sh"), "{err}");
    }
}
