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
    /// Starts a registry on a free port. Another test may take the port between choosing it
    /// and the registry binding it, so a start that does not answer as a registry is retried
    /// on another port.
    pub fn start() -> std::io::Result<TestRegistry> {
        let mut last = None;
        for _ in 0..5 {
            match Self::try_start() {
                Ok(r) => return Ok(r),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("docker-registry did not start")))
    }

    fn try_start() -> std::io::Result<TestRegistry> {
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
                "version: 0.1\nlog:\n  level: info\n  formatter: text\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                storage.display()
            ),
        )?;
        // The access log says how many bytes each response carried: what an upgrade pulled.
        let log = std::fs::File::create(dir.join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("starting docker-registry (Debian package docker-registry): {e}"),
                )
            })?;
        let mut reg = TestRegistry {
            addr,
            storage,
            dir,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = reg.child.try_wait() {
                return Err(std::io::Error::other(format!(
                    "docker-registry on {} exited ({st})",
                    reg.addr
                )));
            }
            // Ours answers /v2/ with its API version header; anything else is not it.
            if TcpStream::connect(&reg.addr).is_ok()
                && ureq::get(&format!("http://{}/v2/", reg.addr))
                    .call()
                    .is_ok_and(|r| r.headers().contains_key("docker-distribution-api-version"))
            {
                return Ok(reg);
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "docker-registry did not answer on {}",
                    reg.addr
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl TestRegistry {
    /// Bytes the registry has sent in answers to GET requests so far, from its log
    /// (`http.response.written` of each completed response).
    pub fn bytes_served(&self) -> u64 {
        let log = std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("response completed") && l.contains("http.request.method=GET"))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("http.response.written="))
                    .and_then(|v| v.trim_matches('"').parse::<u64>().ok())
            })
            .sum()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
