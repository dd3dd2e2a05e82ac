//! Running shell commands, on the host or chrooted into a target root.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

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
            // The path is made a C string here, before the fork: the child may not allocate.
            let dir = std::ffi::CString::new(self.root.path().as_os_str().as_encoded_bytes())
                .map_err(|_| ExecError::Spawn {
                    cmd: cmd.to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "the root path contains a NUL byte",
                    ),
                })?;
            c.current_dir("/");
            // chroot(2) needs to happen in the child between fork and exec.
            #[allow(unsafe_code)]
            // SAFETY: the closure runs in the forked child before exec; it only makes two
            // async-signal-safe syscalls (chroot, chdir) on C strings built before the fork,
            // and allocates nothing.
            unsafe {
                c.pre_exec(move || {
                    rustix::process::chroot(dir.as_c_str())?;
                    rustix::process::chdir(c"/")?;
                    Ok(())
                });
            }
        }
        run_combined(c, cmd)
    }
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
    let mut c = Command::new(program);
    c.args(args);
    let shown = std::iter::once(program.to_string())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let out = run_combined(c, &shown)?;
    if out.status != 0 {
        return Err(ExecError::Failed {
            cmd: shown,
            status: out.status,
            output: out.output.trim_end().to_string(),
        });
    }
    Ok(out)
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
