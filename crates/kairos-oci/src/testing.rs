//! A throw-away registry for tests: Debian's `docker-registry` on a free loopback port,
//! storing under a temp directory, stopped and removed when dropped.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestRegistry {
    pub addr: String,
    /// The registry's storage root (tests tamper with blobs there).
    pub storage: PathBuf,
    dir: PathBuf,
    child: Child,
}

impl TestRegistry {
    pub fn start() -> std::io::Result<TestRegistry> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let dir = std::env::temp_dir().join(format!(
            "kairos-test-registry-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)?;
        let storage = dir.join("storage");
        let cfg = dir.join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                storage.display()
            ),
        )?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("starting docker-registry (Debian package docker-registry): {e}"),
                )
            })?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&addr).is_err() {
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "docker-registry did not listen on {addr}"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(TestRegistry {
            addr,
            storage,
            dir,
            child,
        })
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
