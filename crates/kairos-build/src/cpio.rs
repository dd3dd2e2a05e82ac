//! A writer for the `newc` cpio format the kernel unpacks as an initramfs.

use std::io::{self, Write};

pub struct Writer<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Writer {
            out,
            ino: 1,
            written: 0,
        }
    }

    fn header(&mut self, name: &str, mode: u32, size: u64) -> io::Result<()> {
        self.header_rdev(name, mode, size, (0, 0))
    }

    fn header_rdev(
        &mut self,
        name: &str,
        mode: u32,
        size: u64,
        rdev: (u32, u32),
    ) -> io::Result<()> {
        let name_len = name.len() + 1;
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize, check
        let h = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.ino, mode, 0, 0, 1, 0, size, 0, 0, rdev.0, rdev.1, name_len, 0
        );
        self.ino += 1;
        self.out.write_all(h.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += (h.len() + name_len) as u64;
        self.pad()
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (4 - (self.written % 4)) % 4;
        self.out.write_all(&[0u8; 3][..rem as usize])?;
        self.written += rem;
        Ok(())
    }

    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.header(name, 0o040755, 0)
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.header(name, 0o100000 | (mode & 0o7777), data.len() as u64)?;
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.pad()
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.header(name, 0o120777, target.len() as u64)?;
        self.out.write_all(target.as_bytes())?;
        self.written += target.len() as u64;
        self.pad()
    }

    /// A character device node (the kernel needs `/dev/console` before `/init` runs).
    pub fn char_dev(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header_rdev(name, 0o020000 | (mode & 0o7777), 0, (major, minor))
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0)?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_tool_reads_it() {
        let mut w = Writer::new(Vec::new());
        w.dir("etc").unwrap();
        w.file("etc/x", 0o644, b"hello").unwrap();
        w.symlink("init", "/bin/sh").unwrap();
        let data = w.finish().unwrap();
        assert_eq!(data.len() % 4, 0);
        let mut child = std::process::Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("cpio (Debian package cpio; scripts/setup installs it)");
        child.stdin.take().unwrap().write_all(&data).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "etc\netc/x\ninit\n");
    }
}
