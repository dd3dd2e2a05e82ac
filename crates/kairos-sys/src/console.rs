//! Asking a person at the console: a secret typed without echo (the initrd's passphrase
//! prompt when the TPM will not unseal a disk's key).

use std::fs::OpenOptions;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;

/// The longest answer read (a passphrase or a recovery key).
pub const MAX_SECRET: usize = 1024;

/// The kernel's console log level (`/proc/sys/kernel/printk`, first field) while a person
/// types: only emergencies print, so kernel messages do not land inside the prompt or the
/// answer's line.
const QUIET_LEVEL: &str = "1";

/// Turns kernel messages on the console down to emergencies until dropped, then back to
/// the level before.
struct QuietKernel(Option<String>);

impl QuietKernel {
    const PRINTK: &'static str = "/proc/sys/kernel/printk";

    fn new() -> QuietKernel {
        let before = std::fs::read_to_string(Self::PRINTK)
            .ok()
            .and_then(|s| s.split_whitespace().next().map(str::to_string));
        if before.is_some() {
            let _ = std::fs::write(Self::PRINTK, QUIET_LEVEL);
        }
        QuietKernel(before)
    }
}

impl Drop for QuietKernel {
    fn drop(&mut self) {
        if let Some(level) = &self.0 {
            let _ = std::fs::write(Self::PRINTK, level);
        }
    }
}

/// Prints `prompt` on `/dev/console` and reads one line with echo turned off; the line
/// without its end. Kernel messages stay off the console meanwhile. Errors when there is
/// no console or it is closed.
pub fn ask_secret(prompt: &str) -> io::Result<String> {
    let _quiet = QuietKernel::new();
    let tty = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")?;
    let fd = tty.as_raw_fd();
    // SAFETY: termios is plain data; tcgetattr fills it for a valid open fd.
    #[allow(unsafe_code)]
    let saved = unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        (libc::tcgetattr(fd, &mut t) == 0).then_some(t)
    };
    if let Some(mut t) = saved {
        t.c_lflag &= !libc::ECHO;
        t.c_lflag |= libc::ICANON;
        // SAFETY: a valid fd and a termios read from it.
        #[allow(unsafe_code)]
        unsafe {
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
    }
    let mut out = &tty;
    out.write_all(prompt.as_bytes())?;
    out.flush()?;
    let mut line = Vec::new();
    let r = read_line(BufReader::new(&tty), &mut line);
    if let Some(t) = saved {
        // SAFETY: as above; restores what was there.
        #[allow(unsafe_code)]
        unsafe {
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
    }
    let _ = out.write_all(b"\n");
    r?;
    while line.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

/// One line, at most [`MAX_SECRET`] bytes; end of input is an error.
fn read_line(r: impl BufRead, buf: &mut Vec<u8>) -> io::Result<()> {
    if r.take(MAX_SECRET as u64).read_until(b'\n', buf)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the console closed",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn lines_are_bounded() {
        let mut b = Vec::new();
        super::read_line(&b"secret\nrest"[..], &mut b).unwrap();
        assert_eq!(b, b"secret\n");
        let long = vec![b'a'; 5000];
        let mut b = Vec::new();
        super::read_line(&long[..], &mut b).unwrap();
        assert_eq!(b.len(), super::MAX_SECRET);
        assert!(super::read_line(&b""[..], &mut Vec::new()).is_err());
    }
}
